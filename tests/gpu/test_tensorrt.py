"""GPU checks of the TensorRT path: real plans for a tiny DiT, built with Polygraphy and run with
device-resident state and CUDA graphs, against ONNX Runtime on the CPU; CUDA-graph replay against
eager launches; a partial step against a full step; ONNX Runtime's CUDA provider with CUDA graphs.

Skipped, with what is missing, where TensorRT or a CUDA GPU is not there.
"""

from __future__ import annotations

import shutil
import statistics
import time

import numpy as np
import pytest

from clusca_trt.config import ClusCaConfig
from clusca_trt.engines.cuda_graph import Action
from clusca_trt.engines.manifest import Manifest
from clusca_trt.engines.ort import OrtEngine, probe_providers
from clusca_trt.errors import BackendUnavailableError, EngineMismatchError
from clusca_trt.runtime.pipeline import Pipeline


def _missing() -> str | None:
    from clusca_trt.engines.trt_plan import require_tensorrt

    try:
        require_tensorrt()
    except BackendUnavailableError as e:
        return f"needs TensorRT: {e}"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__} (TensorRT plans need one)"
    return None


MISSING = _missing()
needs_trt = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# max |a - b| / max |b| over whole sampling runs (20 steps) of the tiny random-weight DiT; fp32 has
# TF32 off; fp16 / bf16 run MatMul/Gemm/Conv in the low type, everything else in fp32
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 8e-2}
RUN = {"seed": 0, "steps": 20, "interval": 3}


def _copy(manifest: Manifest, dst) -> Manifest:
    shutil.copytree(manifest.directory, dst)
    return Manifest.read(dst)


@pytest.fixture(scope="module", params=["fp32", "fp16", "bf16"])
def trt_dir(request, engines_k4, tmp_path_factory):
    from clusca_trt.exporters.trt_build import TrtBuildOptions, build_plans

    manifest = _copy(engines_k4, tmp_path_factory.mktemp("trt") / request.param)
    timing = tmp_path_factory.getbasetemp() / "timing.cache"  # shared: reused across the three builds
    options = TrtBuildOptions(precision=request.param, optimization_level=2, timing_cache=str(timing))
    return request.param, build_plans(manifest, options)


def _trt_pipeline(manifest: Manifest, cuda_graphs=True) -> Pipeline:
    from clusca_trt.engines.tensorrt import load_engine

    engine = load_engine(manifest, cuda_graphs=cuda_graphs)
    return Pipeline(engine, manifest.model, ClusCaConfig(**manifest.defaults), manifest)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@needs_trt
@pytest.mark.parametrize("method", ["full", "taylorseer", "clusca"])
def test_tensorrt_matches_onnx_runtime_cpu(trt_dir, method):
    precision, manifest = trt_dir
    if method == "clusca" and precision != "fp32":
        pytest.skip("k-means on low-precision hidden states may flip cluster assignments: compared in fp32 only")
    with Pipeline.load(manifest.directory, provider="cpu") as cpu:
        ref = cpu.generate([1, 2], method=method, **RUN)
    with _trt_pipeline(manifest) as pipe:
        out = pipe.generate([1, 2], method=method, **RUN)
    assert out.backend == "tensorrt"
    assert _rel(out.latents, ref.latents) < TOLERANCE[precision], (precision, method, _rel(out.latents, ref.latents))


@needs_trt
def test_plans_are_reused_and_refused_on_another_platform(trt_dir, tmp_path):
    from clusca_trt.engines.tensorrt import load_engine
    from clusca_trt.exporters.trt_build import TrtBuildOptions, build_plans

    precision, manifest = trt_dir
    plans = sorted(manifest.directory.glob("*.plan"))
    mtimes = [p.stat().st_mtime_ns for p in plans]
    again = build_plans(manifest, TrtBuildOptions(precision=precision, optimization_level=2,
                                                  timing_cache=str(tmp_path / "t.cache")))
    assert again.data["tensorrt"]["key"] == manifest.data["tensorrt"]["key"]
    assert [p.stat().st_mtime_ns for p in plans] == mtimes
    other = _copy(manifest, tmp_path / "other")
    data = dict(other.data)
    data["tensorrt"] = dict(data["tensorrt"], platform=dict(data["tensorrt"]["platform"], tensorrt="9.0.0"))
    Manifest(data, other.directory).write()
    with pytest.raises(EngineMismatchError, match="built with TensorRT 9.0.0 .* rebuild them with clusca-trt build"):
        load_engine(Manifest.read(other.directory))


@needs_trt
def test_cuda_graph_replay_equals_eager_execution(trt_dir):
    _, manifest = trt_dir
    with _trt_pipeline(manifest, cuda_graphs=False) as eager:
        a = eager.generate([1, 2], method="clusca", **RUN).latents
    with _trt_pipeline(manifest, cuda_graphs=True) as graphed:
        b = graphed.generate([1, 2], method="clusca", **RUN).latents
        stats = graphed.engine.graphs.stats
    assert stats[Action.CAPTURE] >= 2 and stats[Action.REPLAY] >= 2
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())


@needs_trt
def test_reallocated_buffers_are_recaptured(trt_dir):
    _, manifest = trt_dir
    with _trt_pipeline(manifest) as pipe:
        first = pipe.generate([1, 2], method="clusca", **RUN).latents
        captured = pipe.engine.graphs.stats[Action.CAPTURE]
        pipe.engine.reallocate()
        second = pipe.generate([1, 2], method="clusca", **RUN).latents
        assert pipe.engine.graphs.stats[Action.CAPTURE] == 2 * captured
    np.testing.assert_allclose(second, first, rtol=0, atol=1e-6 * np.abs(first).max())


@pytest.fixture(scope="module")
def dit_s2_plans(tmp_path_factory):
    """DiT-S/2 at 256 px (256 tokens, 12 blocks; random weights), fp16 plans: big enough that a
    step's cost is its kernels, not its launches."""
    from clusca_trt.exporters.build import build_engines
    from clusca_trt.exporters.trt_build import TrtBuildOptions, build_plans
    from clusca_trt.models import load_model
    from clusca_trt.spec import BuildOptions

    model = load_model("dit-s-2", random_init=True, seed=0)
    out = tmp_path_factory.mktemp("dits") / "dit-s-2"
    manifest = build_engines(model, BuildOptions(batch=1, clusters=16, order=2), out).manifest
    return build_plans(manifest, TrtBuildOptions(precision="fp16", optimization_level=3))


@needs_trt
def test_partial_step_is_faster_than_full_step(dit_s2_plans):
    with _trt_pipeline(dit_s2_plans) as pipe:
        pipe.generate([1], method="clusca", seed=0, steps=50, interval=5)  # warm up: capture the graphs
        out = pipe.generate([1], method="clusca", seed=0, steps=50, interval=5)
    full = statistics.median(out.timings["full"])
    partial = statistics.median(out.timings["partial"])
    print(f"DiT-S/2 fp16 TensorRT: full step {full * 1e3:.3f} ms, partial step {partial * 1e3:.3f} ms "
          f"(select {statistics.median(out.timings['select_img']) * 1e3:.3f} ms queued), x{full / partial:.2f}")
    assert partial < full


@pytest.mark.skipif("cuda" not in probe_providers(),
                    reason="ONNX Runtime's CUDAExecutionProvider does not load here (needs an NVIDIA GPU, CUDA and cuDNN)")
def test_onnx_runtime_cuda_graphs_equal_plain_cuda(engines_k4):
    spec, paths = engines_k4.spec, engines_k4.graph_paths()
    results = []
    for cuda_graph in (False, True):
        engine = OrtEngine(spec, paths, provider="cuda", cuda_graph=cuda_graph)
        pipe = Pipeline(engine, engines_k4.model, ClusCaConfig(**engines_k4.defaults), engines_k4)
        started = time.perf_counter()
        results.append(pipe.generate([1, 2], method="clusca", **RUN).latents)
        print(f"ONNX Runtime CUDA, CUDA graphs {cuda_graph}: {time.perf_counter() - started:.3f} s")
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-5 * np.abs(results[0]).max())
