"""The openvino backend: the build's graphs on OpenVINO's CPU plugin equal ONNX Runtime (fp32 to
1e-4, bf16 within 5e-2 where the CPU has bf16 units), clustering and selection compiled at fp32,
the state bound once and never copied (counted), the compiled-model cache reused by a second load,
and the options from Pipeline.load to the CLI.

Errors are measured as max |a - b| / max |b| over the final latents of whole sampling runs
(20 DDIM steps, guidance, two samples, seed 3) of the tiny random-weight DiT (``engines_k4``).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino", reason="the openvino extra is not installed")

from clusca_trt.cli import main  # noqa: E402
from clusca_trt.engines.openvino import (CACHE_DIR, OpenVinoEngine, choose_precision, cpu_capabilities,
                                         graph_config)  # noqa: E402
from clusca_trt.errors import BackendUnavailableError, ConfigError, EngineError  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402

RUN = {"seed": 3, "steps": 20}
METHODS = ("full", "clusca", "taylorseer")
INTERVAL = {"full": None, "clusca": 3, "taylorseer": 3}
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # max relative error of the final latents vs ONNX Runtime fp32
HAS_BF16 = "BF16" in cpu_capabilities()


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ort_latents(engines_k4):
    with Pipeline.load(engines_k4.directory, provider="cpu") as pipe:
        return {m: pipe.generate([1, 7], method=m, interval=INTERVAL[m], **RUN).latents for m in METHODS}


@pytest.fixture(scope="module", params=[
    "fp32", pytest.param("bf16", marks=pytest.mark.skipif(not HAS_BF16, reason="OpenVINO reports no bf16 units "
                                                                              "on this CPU"))])
def ov_pipe(request, engines_k4):
    with Pipeline.load(engines_k4.directory, backend="openvino", precision=request.param, threads=1) as pipe:
        yield request.param, pipe


@pytest.mark.parametrize("method", METHODS)
def test_openvino_equals_onnx_runtime(ov_pipe, ort_latents, method):
    precision, pipe = ov_pipe
    out = pipe.generate([1, 7], method=method, interval=INTERVAL[method], **RUN)
    assert out.backend == "openvino" and out.provider is None
    assert (out.engine.backend, out.engine.device, out.engine.precision) == ("openvino", "cpu", precision)
    assert out.engine.hardware  # the CPU's model name
    err = _rel(out.latents, ort_latents[method])
    assert err < TOLERANCE[precision], (precision, method, err)


def test_clustering_and_selection_compile_at_fp32(ov_pipe):
    precision, pipe = ov_pipe
    want = {"fp32": "f32", "bf16": "bf16"}[precision]
    for name, compiled in pipe.engine.compiled.items():
        ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        assert ran == ("f32" if name.startswith(("cluster_", "select_")) else want), name


@pytest.mark.parametrize("requested, capabilities, want", [
    (None, ("FP32", "BF16", "INT8"), "bf16"),  # bf16 units: bf16 by default
    (None, ("FP32", "INT8", "BIN"), "fp32"),  # none: fp32
    (None, ("FP32", "FP16", "INT8"), "fp32"),  # fp16 units alone do not change the default
    ("fp32", ("FP32", "BF16"), "fp32"),
    ("bf16", ("FP32", "BF16"), "bf16"),
    ("fp16", ("FP32", "BF16", "FP16"), "fp16"),
])
def test_precision_choice(requested, capabilities, want):
    assert choose_precision(requested, capabilities) == want


@pytest.mark.parametrize("requested, capabilities, error, message", [
    ("bf16", ("FP32", "INT8"), BackendUnavailableError, "openvino precision bf16 needs a CPU with BF16 units"),
    ("fp16", ("FP32", "BF16"), BackendUnavailableError, "openvino precision fp16 needs a CPU with FP16 units"),
    ("int8", ("FP32",), EngineError, "openvino precision must be one of fp32, bf16, fp16, got 'int8'"),
])
def test_precision_the_cpu_cannot_run_is_refused(requested, capabilities, error, message):
    with pytest.raises(error, match=message):
        choose_precision(requested, capabilities)


@pytest.mark.parametrize("graph, want", [("plain", "bf16"), ("full", "bf16"), ("partial", "bf16"), ("cond", "bf16"),
                                         ("forecast", "bf16"), ("cluster_img", "f32"), ("select_txt", "f32")])
def test_graph_config_keeps_k_means_and_selection_at_fp32(graph, want, tmp_path):
    config = graph_config(graph, "bf16", 2, tmp_path)
    assert config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": want, "INFERENCE_NUM_THREADS": 2,
                      "CACHE_DIR": str(tmp_path), "ENABLE_CPU_PINNING": False}
    assert "INFERENCE_NUM_THREADS" not in graph_config(graph, "fp32", None, None)


def test_state_is_bound_once_and_never_copied(engines_k4):
    """After loading, a sampling run binds no state tensor anew: it re-binds a ping-pong port to the
    other of its two load-time tensors where its graph last saw the other one, and wraps the host
    feeds (one binding each per call); every state port of every request reads and writes the
    engine's own arrays (shared memory, no copy in or out)."""
    with Pipeline.load(engines_k4.directory, backend="openvino", precision="fp32") as pipe:
        engine = pipe.engine
        arrays = engine.state_arrays()
        ids = {n: [id(a) for a in bufs] for n, bufs in arrays.items()}
        assert {n for n, bufs in arrays.items() if len(bufs) == 2} == set(engine.pingpong)
        calls: list[str] = []
        run = engine.run
        engine.run = lambda graph, feeds: (calls.append(graph), run(graph, feeds))[1]
        before = dict(engine.binds)
        pipe.generate([1, 7], method="clusca", interval=3, **RUN)
        binds = {k: engine.binds[k] - before.get(k, 0) for k in ("state", "feed", "swap")}
        assert binds["state"] == 0
        assert binds["feed"] == sum(len(engine.host_inputs(g)) for g in calls)
        # at most the two ports (read, write) of each ping-pong tensor a call touches
        spec = pipe.spec
        touched = {g: sum(1 for t in spec.graphs[g].inputs + spec.graphs[g].outputs if t.state_name in engine.pingpong)
                   for g in spec.graphs}
        assert 0 < binds["swap"] <= sum(touched[g] for g in calls)
        assert {n: [id(a) for a in bufs] for n, bufs in engine.state_arrays().items()} == ids
        for graph, g in spec.graphs.items():
            request = engine.requests[graph]
            for t in g.inputs + g.outputs:
                if t.state_name in arrays:
                    bound = request.get_tensor(t.name).data
                    assert any(np.shares_memory(bound, a) for a in arrays[t.state_name]), (graph, t.name)
        # the state the runtime reads back is the array the last graph wrote
        name = spec.cache_tensors()[0].name
        assert np.shares_memory(engine.state_array(name), engine.requests["full"].get_tensor(name).data) or \
            np.shares_memory(engine.state_array(name), engine.requests["partial"].get_tensor(name).data)


def test_a_second_load_reuses_the_compiled_model_cache(engines_k4, tmp_path):
    spec, paths = engines_k4.spec, engines_k4.graph_paths()
    cache = tmp_path / "cache"
    first = OpenVinoEngine(spec, paths, precision="fp32", cache_dir=cache)
    assert not any(first.loaded_from_cache.values())
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(files) >= len(paths)
    second = OpenVinoEngine(spec, paths, precision="fp32", cache_dir=cache)
    assert all(second.loaded_from_cache.values()), second.loaded_from_cache
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # nothing rewritten
    feeds = {t.name: np.zeros(t.shape, np.float32 if t.dtype == "float32" else np.int64)
             for t in second.host_inputs("plain")}
    np.testing.assert_array_equal(first.run("plain", feeds), second.run("plain", feeds))
    first.close(), second.close()


def test_pipeline_keeps_the_cache_in_the_engine_directory(engines_k4):
    with Pipeline.load(engines_k4.directory, backend="openvino", precision="fp32"):
        pass
    assert any((engines_k4.directory / CACHE_DIR).iterdir())
    with Pipeline.load(engines_k4.directory, backend="openvino", precision="fp32") as pipe:
        assert all(pipe.engine.loaded_from_cache.values())


def test_options_are_checked(engines_k4):
    with pytest.raises(ConfigError, match="the openvino backend runs on the CPU: expected device cpu, got 'cuda'"):
        Pipeline.load(engines_k4.directory, backend="openvino", device="cuda")
    with pytest.raises(ConfigError, match="expected provider auto or cpu with openvino, got 'cuda'"):
        Pipeline.load(engines_k4.directory, backend="openvino", provider="cuda")
    if not HAS_BF16:
        with pytest.raises(BackendUnavailableError, match="openvino precision bf16 needs a CPU with BF16 units"):
            Pipeline.load(engines_k4.directory, backend="openvino", precision="bf16")


def test_cli_generate_and_bench_with_openvino(engines_k4, tmp_path):
    out = tmp_path / "ov.npz"
    r = CliRunner().invoke(main, ["generate", str(engines_k4.directory), "--backend", "openvino", "--precision",
                                  "fp32", "--threads", "1", "--steps", "4", "--class-labels", "1,2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "on openvino cpu fp32" in r.output and out.is_file()
    r = CliRunner().invoke(main, ["bench", str(engines_k4.directory), "--backend", "openvino", "--precision", "fp32",
                                  "--steps", "6", "--repeats", "1", "--warmup-runs", "0", "--profile-calls", "1",
                                  "--methods", "clusca", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "openvino fp32, 1 threads" in r.output and "partial graph by component (openvino profile" in r.output
    assert "its floor" in r.output
