"""Issue 12, case 3: NaN and inf are refused. Non-finite numbers and embeddings in: a one-line
``InputError`` before sampling; a non-finite weight: ``CheckpointError`` at build; a non-finite
model output: an ``EngineError`` (``NonFiniteOutputError``) and no output file."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.errors import CheckpointError, EngineError, InputError
from clusca_trt.models import load_model
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import BuildOptions

from .conftest import cli_error, one_line

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pipe(micro):
    return Pipeline.load(micro[2].directory)


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if DiT sampling starts."""
    import clusca_trt.runtime.dit as dit

    def refuse(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(dit, "sample", refuse)


@pytest.mark.parametrize("value", [NAN, INF, -INF, "1.5", True])
def test_cfg_scale_must_be_finite(pipe, no_sampling, value):
    with pytest.raises(InputError) as e:
        pipe.generate([1], steps=4, cfg_scale=value)
    assert "cfg_scale must be a finite number" in one_line(e)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_cfg_scale_must_be_finite(micro, tmp_path, value):
    out = tmp_path / "a.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--cfg-scale", value, "--steps", "4",
                                  "--out", str(out)])
    assert "cfg_scale must be a finite number" in cli_error(r)
    assert not out.exists()


@pytest.fixture(scope="module")
def flux_pipe():
    """flux-tiny (random weights) through the PyTorch reference: no export needed."""
    model = load_model("flux-tiny", random_init=True, seed=0)
    spec = model.adapter.export_spec(BuildOptions(batch=1, clusters=4, order=1))
    return Pipeline.from_adapter(model.adapter, spec)


def _embeds(text=None, pooled=None):
    t = np.zeros((1, 16, 32), np.float32) if text is None else text
    p = np.zeros((1, 16), np.float32) if pooled is None else pooled
    return {"prompt_embeds": t, "pooled_prompt_embeds": p}


def _with(shape, index, value, like=torch):
    a = np.zeros(shape, np.float32)
    a[index] = value
    return torch.from_numpy(a) if like is torch else a


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(_embeds(), guidance_scale=NAN), "guidance_scale must be a finite number"),
        (dict(_embeds(), guidance_scale=INF), "guidance_scale must be a finite number"),
        (_embeds(text=_with((1, 16, 32), (0, 3, 5), NAN, np)), "prompt_embeds: expected finite values"),
        (_embeds(text=_with((1, 16, 32), (0, 0, 0), INF)), "prompt_embeds: expected finite values"),
        (_embeds(pooled=_with((1, 16), (0, 1), NAN, np)), "pooled_prompt_embeds: expected finite values"),
        (_embeds(pooled=_with((1, 16), (0, 2), -INF)), "pooled_prompt_embeds: expected finite values"),
        (dict(_embeds(), text_propagation=NAN), "text_propagation must be a finite number|gamma"),  # was refused
    ],
)
def test_flux_non_finite_inputs_are_refused_before_sampling(flux_pipe, kwargs, message):
    with pytest.raises((InputError, ValueError)) as e:
        flux_pipe.generate(steps=2, **kwargs)
    assert re.search(message, one_line(e))


def _save_dit_tiny(path, tamper):
    sd = {k: v.clone() for k, v in load_model("dit-tiny", random_init=True, seed=1).adapter.model.state_dict().items()}
    tamper(sd)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_a_checkpoint_with_a_non_finite_weight_is_refused(tmp_path, suffix, value):
    def tamper(sd):
        sd["blocks.1.mlp.fc1.weight"][3, 7] = value

    path = _save_dit_tiny(tmp_path / f"ckpt{suffix}", tamper)
    with pytest.raises(CheckpointError) as e:
        load_model("dit-tiny", checkpoint=path)
    assert "expected finite weights, got 1 NaN/inf value(s) in" in one_line(e) and "blocks.1.mlp.fc1.weight" in str(e.value)


def test_a_diffusers_folder_with_a_nan_weight_is_refused(tmp_path):
    from tests.conftest import make_diffusers_dit

    m = make_diffusers_dit(tmp_path / "dit")
    with torch.no_grad():
        m.transformer_blocks[0].ff.net[2].weight[0, 0] = NAN
    m.save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError) as e:
        load_model("dit", checkpoint=tmp_path / "dit")
    assert "expected finite weights" in one_line(e)


def test_a_flux_folder_with_an_inf_weight_is_refused(tmp_path):
    model = load_model("flux-tiny", random_init=True, seed=0).adapter.model
    with torch.no_grad():
        next(model.parameters()).view(-1)[5] = INF
    model.save_pretrained(tmp_path / "flux" / "transformer")
    with pytest.raises(CheckpointError) as e:
        load_model("flux-tiny", checkpoint=tmp_path / "flux")
    assert "expected finite weights" in one_line(e)


def _nan_after(monkeypatch, calls: int):
    """ONNX Runtime's ``out`` turns NaN after ``calls`` graph calls that return one."""
    import clusca_trt.engines.ort as ort_mod

    real = ort_mod.OrtEngine.run
    seen = []

    def run(self, graph, feeds):
        out = real(self, graph, feeds)
        if out is not None:
            seen.append(graph)
            if len(seen) > calls:
                out = np.full_like(out, np.nan)
        return out

    monkeypatch.setattr(ort_mod.OrtEngine, "run", run)


@pytest.mark.parametrize("method", ["clusca", "full", "taylorseer"])
def test_a_non_finite_model_output_stops_the_run(pipe, monkeypatch, method):
    _nan_after(monkeypatch, 3)
    with pytest.raises(EngineError) as e:
        pipe.generate([1, 2], steps=8, method=method)
    assert type(e.value).__name__ == "NonFiniteOutputError" and "not finite" in one_line(e)


@pytest.mark.parametrize("suffix", [".npz", ".png"])
def test_cli_writes_nothing_when_the_model_output_is_not_finite(micro, micro_pixels, tmp_path, monkeypatch, suffix):
    import shutil

    d = tmp_path / "eng"
    # .png: the pixel-space micro DiT, whose pixels decoder makes images
    shutil.copytree((micro_pixels if suffix == ".png" else micro[2]).directory, d)
    _nan_after(monkeypatch, 5)
    out = tmp_path / f"a{suffix}"
    r = CliRunner().invoke(main, ["-q", "generate", str(d), "--steps", "8", "--out", str(out)])
    assert "not finite" in cli_error(r)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".a")]


def test_the_check_costs_little(pipe):
    """One ``np.isfinite`` over ``out`` per step: under 5% of a micro step here (measured, not assumed)."""
    import time

    out = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(1000):
        np.isfinite(out).all()
    check = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    pipe.generate([1], steps=20, method="full")
    step = (time.perf_counter() - t0) / 20
    assert check < 0.05 * step, (check, step)
    assert math.isfinite(step)
