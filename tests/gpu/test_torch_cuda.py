"""GPU checks of the torch backend on CUDA: fp32 against ONNX Runtime on the CPU (TF32 off,
tests/gpu/conftest.py), bf16 within the CPU targets, every graph captured once as a CUDA graph and
replayed, replay equal to eager launches, the whole loop on the device equal to the host loop with
one host synchronisation per sample, the device index honoured, FLUX's diffusers modules under capture.

Skipped, with the reason, where torch sees no CUDA GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusca_trt.engines.cuda_graph import Action
from clusca_trt.models import load_model
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import BuildOptions

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})",
)

RUN = {"seed": 3, "steps": 20}
INTERVAL = {"full": None, "clusca": 3, "taylorseer": 3}
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # max |a - b| / max |b| of the final latents, as on the CPU


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ort_latents(engines_k4):
    with Pipeline.load(engines_k4.directory, provider="cpu") as pipe:
        return {m: pipe.generate([1, 7], method=m, interval=i, **RUN).latents for m, i in INTERVAL.items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", list(INTERVAL))
def test_cuda_engine_matches_onnx_runtime_cpu(engines_k4, ort_latents, precision, method):
    with Pipeline.load(engines_k4.directory, backend="torch", device="cuda", precision=precision) as pipe:
        first = pipe.generate([1, 7], method=method, interval=INTERVAL[method], **RUN).latents  # warm-up + capture
        again = pipe.generate([1, 7], method=method, interval=INTERVAL[method], **RUN).latents  # replays
        assert pipe.engine.graphs.stats[Action.REPLAY] > 0
    for out in (first, again):
        assert _rel(out, ort_latents[method]) < TOLERANCE[precision], (precision, method, _rel(out, ort_latents[method]))


def test_every_graph_is_captured_once_and_replay_equals_eager(engines_k4):
    with Pipeline.load(engines_k4.directory, backend="torch", device="cuda") as pipe:
        eager = Pipeline(type(pipe.engine)(pipe.engine.adapter, pipe.spec, "cuda", cuda_graphs=False), pipe.model,
                         pipe.defaults)
        a = eager.generate([1, 7], method="clusca", interval=3, **RUN).latents
        for _ in range(3):
            b = pipe.generate([1, 7], method="clusca", interval=3, **RUN).latents
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
        used = {"full", "cluster_img", "select_img", "partial"}  # what a ClusCa run calls (not forecast)
        stats = pipe.engine.graphs.stats
        assert stats[Action.CAPTURE] == len(used) == len(pipe.engine.graphs)  # once each, never again
        assert stats[Action.EAGER] == len(used)  # one warm-up call each
        assert eager.engine.graphs.stats[Action.CAPTURE] == 0


@pytest.mark.parametrize("device_loop", [True, False])
def test_host_synchronisations(engines_k4, device_loop):
    """The whole loop on the device: one per sample chunk (the final latents); step by step: one per step."""
    with Pipeline.load(engines_k4.directory, backend="torch", device="cuda", precision="bf16") as pipe:
        pipe.engine.device_loop = device_loop
        pipe.generate([1, 7], method="clusca", interval=3, **RUN)  # captures (one synchronisation each)
        before = pipe.engine.host_syncs
        pipe.generate([1, 7], method="clusca", interval=3, **RUN)
        assert pipe.engine.host_syncs - before == (1 if device_loop else RUN["steps"])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_device_loop_equals_the_host_loop_on_cuda(engines_k4, sampler):
    with Pipeline.load(engines_k4.directory, backend="torch", device="cuda") as pipe:
        kw = dict(method="clusca", interval=3, sampler=sampler, **RUN)
        on_device = pipe.generate([1, 7], **kw).latents
        pipe.engine.device_loop = False
        host = pipe.generate([1, 7], **kw).latents
    assert _rel(on_device, host) < 1e-4


def test_the_device_index_is_honoured(engines_k4):
    index = torch.cuda.device_count() - 1
    with Pipeline.load(engines_k4.directory, backend="torch", device=f"cuda:{index}") as pipe:
        assert {b.device for b in pipe.engine._state.values()} == {torch.device("cuda", index)}
        assert {p.device for p in pipe.engine.adapter.parameters()} == {torch.device("cuda", index)}
        assert pipe.engine.info.device == f"cuda:{index}" and pipe.engine.provider is None
        assert np.isfinite(pipe.generate([1, 7], seed=0, steps=4).latents).all()


def test_flux_modules_run_under_cuda_graphs():
    """FLUX's step graphs are diffusers' modules (attention dispatch, rotary embeddings): captured
    and replayed, they compute what the CPU reference computes."""
    from clusca_trt.models.flux import NAMED_CONFIGS

    cfg = NAMED_CONFIGS["flux-tiny"]
    rng = np.random.default_rng(0)
    embeds = dict(prompt_embeds=rng.standard_normal((1, cfg.text_length, cfg.joint_attention_dim), np.float32),
                  pooled_prompt_embeds=rng.standard_normal((1, cfg.pooled_projection_dim), np.float32))
    options = BuildOptions(batch=1, clusters=4, text_clusters=3, order=1)
    results = []
    for device, runs in (("cpu", 1), ("cuda", 2)):
        model = load_model("flux-tiny", random_init=True, seed=0)
        pipe = Pipeline.from_adapter(model.adapter, model.adapter.export_spec(options), device=device)
        for _ in range(runs):  # on CUDA: warm-up and capture, then replay
            out = pipe.generate(**embeds, seed=0, steps=10, method="clusca", interval=3).latents
        results.append(out)
    assert pipe.engine.graphs.stats[Action.REPLAY] > 0
    assert _rel(results[1], results[0]) < 1e-3
