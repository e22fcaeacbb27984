"""The torch backend on the CPU: fp32 equals the ONNX Runtime engines, bf16 / fp16 stay close;
static buffers allocated once; caches in the precision, k-means in fp32; one host
synchronisation per step; device and precision options from Pipeline.load to the CLI.

Errors are measured as max |a - b| / max |b| over the final latents of whole sampling runs
(20 DDIM steps, guidance, two samples, seed 3) of the tiny random-weight DiT.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clusca_trt import ops
from clusca_trt.cli import main
from clusca_trt.engines.torch_backend import TorchEngine, parse_device
from clusca_trt.errors import BackendUnavailableError, ConfigError
from clusca_trt.models import load_model
from clusca_trt.runtime.pipeline import Pipeline

RUN = {"seed": 3, "steps": 20}
METHODS = ("full", "clusca", "taylorseer")
INTERVAL = {"full": None, "clusca": 3, "taylorseer": 3}
# max relative error of the final latents against ONNX Runtime fp32 (see the module docstring)
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ort_latents(engines_k4):
    with Pipeline.load(engines_k4.directory, provider="cpu") as pipe:
        return {m: pipe.generate([1, 7], method=m, interval=INTERVAL[m], **RUN).latents for m in METHODS}


@pytest.fixture(scope="module", params=["fp32", "bf16", "fp16"])
def torch_pipe(request, engines_k4):
    """The torch backend over the model the engines were built from, loaded anew (its own weights)."""
    with Pipeline.load(engines_k4.directory, backend="torch", device="cpu", precision=request.param) as pipe:
        yield request.param, pipe


@pytest.mark.parametrize("method", METHODS)
def test_torch_backend_equals_onnx_runtime(torch_pipe, ort_latents, method):
    precision, pipe = torch_pipe
    out = pipe.generate([1, 7], method=method, interval=INTERVAL[method], **RUN)
    assert out.backend == "torch" and out.provider is None
    assert (out.engine.backend, out.engine.device, out.engine.precision) == ("torch", "cpu", precision)
    err = _rel(out.latents, ort_latents[method])
    assert err < TOLERANCE[precision], (precision, method, err)


def test_caches_take_the_precision_and_k_means_stays_fp32(torch_pipe):
    precision, pipe = torch_pipe
    engine = pipe.engine
    low = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    for t in pipe.spec.cache_tensors():
        assert engine._state[t.name].dtype == low, t.name
    for name in ("hidden_img", "centroids_img", "dist_img"):
        assert engine._state[name].dtype == torch.float32, name
    assert engine._state["assign_img"].dtype == engine._state["fresh_img"].dtype == torch.int64
    assert {p.dtype for p in engine.adapter.parameters()} == {low}
    assert engine.weight_bytes() == sum(p.numel() for p in engine.adapter.parameters()) * low.itemsize


@pytest.mark.parametrize("device_loop", [True, False])
def test_buffers_are_allocated_once_and_host_syncs_are_counted(engines_k4, device_loop):
    """The whole loop on the device: one host synchronisation per chunk (the final latents); step by
    step: one per step (``out``)."""
    with Pipeline.load(engines_k4.directory, backend="torch") as pipe:
        engine = pipe.engine
        engine.device_loop = device_loop
        buffers = {**{("state", n): b for n, b in engine._state.items()},
                   **{("input",) + k: b for k, b in engine._inputs.items()},
                   **{("out", n): b for n, b in engine._out.items()}}
        addresses = {k: b.data_ptr() for k, b in buffers.items()}
        before = engine.host_syncs
        pipe.generate([1, 7, 3], method="clusca", interval=3, **RUN)  # two chunks of the engine batch (2)
        assert engine.host_syncs - before == (2 if device_loop else 2 * RUN["steps"])
        assert {k: b.data_ptr() for k, b in buffers.items()} == addresses
        assert set(engine._inputs) == {(g, t.name) for g in pipe.spec.graphs for t in engine.host_inputs(g)}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("method, fresh", [("clusca", "random"), ("clusca", "nearest"), ("taylorseer", None),
                                           ("full", None)])
def test_device_loop_equals_the_host_loop(engines_k4, sampler, method, fresh):
    """The same draws (k-means starts, fresh-token keys, DDPM noise) in the same order, guidance and
    the sampler in torch: the same latents (fp32, CPU)."""
    with Pipeline.load(engines_k4.directory, backend="torch") as pipe:
        kw = dict(method=method, interval=INTERVAL[method], fresh=fresh, sampler=sampler, **RUN)
        on_device = pipe.generate([1, 7, 3], **kw).latents
        pipe.engine.device_loop = False
        host = pipe.generate([1, 7, 3], **kw).latents
    assert _rel(on_device, host) < 1e-4, _rel(on_device, host)


def test_flux_device_loop_equals_the_host_loop():
    from clusca_trt.spec import BuildOptions

    model = load_model("flux-tiny", random_init=True, seed=0)
    cfg = model.adapter.cfg
    pipe = Pipeline.from_adapter(model.adapter, model.adapter.export_spec(BuildOptions(batch=1, clusters=4,
                                                                                       text_clusters=3, order=1)))
    rng = np.random.default_rng(0)
    embeds = dict(prompt_embeds=rng.standard_normal((2, cfg.text_length, cfg.joint_attention_dim), np.float32),
                  pooled_prompt_embeds=rng.standard_normal((2, cfg.pooled_projection_dim), np.float32))
    before = pipe.engine.host_syncs
    on_device = pipe.generate(**embeds, seed=0, steps=10, method="clusca", interval=3).latents
    assert pipe.engine.host_syncs - before == 2  # two samples, a chunk each: one download each
    pipe.engine.device_loop = False
    host = pipe.generate(**embeds, seed=0, steps=10, method="clusca", interval=3).latents
    assert _rel(on_device, host) < 1e-4, _rel(on_device, host)


def test_k_means_in_bf16_flips_assignments(engines_k4):
    """Why the cluster graph runs in fp32: on the hidden states of a real full step, Lloyd's
    k-means in bf16 (inputs and arithmetic) assigns some tokens to other clusters than in fp32,
    while fp32 on bf16-rounded hidden states (what the bf16 engine does) stays close."""
    with Pipeline.load(engines_k4.directory, backend="torch") as pipe:
        pipe.generate([1, 7], method="clusca", seed=0, steps=2, interval=3)  # one full step + k-means
        hidden = torch.from_numpy(pipe.engine.read_state("hidden_img"))
    B, T, D = hidden.shape
    K = pipe.spec.options.clusters
    init = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(b))[:K] for b in range(B)])
    cold = torch.zeros(B, K, D)
    ref, _, _ = ops.kmeans(hidden, cold, init, torch.zeros(1), 10, "l1")
    low, _, _ = ops.kmeans(hidden.bfloat16(), cold.bfloat16(), init, torch.zeros(1, dtype=torch.bfloat16), 10, "l1")
    rounded, _, _ = ops.kmeans(hidden.bfloat16().float(), cold, init, torch.zeros(1), 10, "l1")
    flips_bf16 = (low != ref).float().mean().item()
    flips_rounded = (rounded != ref).float().mean().item()
    print(f"k-means assignments differing from fp32: bf16 arithmetic {flips_bf16:.1%}, fp32 on bf16 inputs "
          f"{flips_rounded:.1%} ({B} x {T} tokens, K={K})")
    assert flips_rounded <= flips_bf16


def test_device_and_precision_are_checked(tiny_model, engines_k4):
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16, got 'int8'"):
        TorchEngine(tiny_model.adapter, engines_k4.spec, precision="int8")
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N, got 'tpu'"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="device cuda:1 needs a CUDA GPU, got .*torch"):
            parse_device("cuda:1")
    with pytest.raises(ConfigError, match="device and precision apply to the torch, openvino and tensorrt backends"):
        Pipeline.load(engines_k4.directory, precision="bf16")


def test_cli_generate_with_the_torch_backend_in_bf16(engines_k4, tmp_path):
    out = tmp_path / "bf16.npz"
    r = CliRunner().invoke(main, ["generate", str(engines_k4.directory), "--backend", "torch", "--precision", "bf16",
                                  "--device", "cpu", "--steps", "4", "--class-labels", "1,2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "on torch cpu bf16" in r.output and out.is_file()
    r = CliRunner().invoke(main, ["generate", str(engines_k4.directory), "--precision", "bf16", "--steps", "2",
                                  "--out", str(tmp_path / "x.npz")])
    assert r.exit_code == 1 and "device and precision apply to the torch, openvino and tensorrt backends" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["generate", str(engines_k4.directory), "--backend", "torch", "--device", "cuda",
                                      "--steps", "2", "--out", str(tmp_path / "y.npz")])
        assert r.exit_code == 1 and r.output.strip().splitlines() == [
            f"Error: device cuda needs a CUDA GPU, got a CPU-only build of torch (torch {torch.__version__})"]


def test_from_adapter_casts_the_adapter_in_place():
    model = load_model("dit-tiny", random_init=True, seed=0)
    spec = model.adapter.export_spec(__import__("clusca_trt.spec", fromlist=["BuildOptions"]).BuildOptions(batch=1))
    pipe = Pipeline.from_adapter(model.adapter, spec, precision="bf16")
    assert pipe.engine.adapter is model.adapter
    assert {p.dtype for p in model.adapter.parameters()} == {torch.bfloat16}
    assert np.isfinite(pipe.generate([1], seed=0, steps=3).latents).all()
