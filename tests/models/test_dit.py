"""DiT: both checkpoint formats load into the original architecture exactly, and bad
checkpoints get one-line errors."""

import numpy as np
import pytest
import torch

from clusca_trt.context import FullContext
from clusca_trt.errors import CheckpointError, ConfigError
from clusca_trt.models import dit, load_model
from clusca_trt.spec import BuildOptions
from tests.conftest import TINY, make_diffusers_dit


def _inputs(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([999.0, 500.0, 3.0][:batch])
    y = torch.tensor([1, 7, cfg.num_classes][:batch])  # the last one is the null class
    return x, t, y


def test_diffusers_folder_equals_diffusers_forward(tmp_path):
    theirs = make_diffusers_dit(tmp_path / "dit")
    loaded = load_model("dit", checkpoint=tmp_path / "dit")
    assert loaded.source["kind"] == "diffusers" and len(loaded.source["sha256"]) == 64
    ours = loaded.adapter.model
    x, t, y = _inputs(ours.cfg)
    with torch.no_grad():
        want = theirs(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pipeline_layout_folder_loads(tmp_path):
    make_diffusers_dit(tmp_path / "pipe" / "transformer")
    assert load_model("dit", checkpoint=tmp_path / "pipe").adapter.cfg.depth == 2


def test_original_checkpoint_roundtrip(tmp_path):
    model = dit.init_random(dit.DiT(dit.NAMED_CONFIGS["dit-tiny"]), seed=3)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    torch.save({"ema": model.state_dict(), "model": {}}, tmp_path / "train.pt")
    x, t, y = _inputs(model.cfg)
    for f in ("tiny.pt", "train.pt"):
        loaded = load_model("dit-tiny", checkpoint=tmp_path / f)
        assert loaded.source["kind"] == "original"
        with torch.no_grad():
            torch.testing.assert_close(loaded.adapter.model(x, t, y), model(x, t, y), atol=0, rtol=0)


def test_adapter_full_step_equals_forward():
    model = dit.init_random(dit.DiT(TINY), seed=1)
    adapter = dit.DiTAdapter(model)
    x, t, y = _inputs(TINY)
    with torch.no_grad():
        ctx = FullContext(adapter.export_spec(BuildOptions(batch=1, clusters=4, order=0)).slots, {}, None)
        got = adapter.forward_step(ctx, {"x": x, **adapter.conditioning({"t": t, "y": y})})
        torch.testing.assert_close(got, model(x, t, y), atol=0, rtol=0)
    assert set(ctx.new_state()) == {f"{s}_f0_{i}_out" for s in ("attn", "mlp") for i in range(TINY.depth)}
    assert ctx.hidden_states["img"].shape == (3, 16, 32)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("wrong-config", "does not match the config: expected pos_embed of shape [1, 64, 64], got [1, 64, 48]"),
        ("missing", "does not match the config: 0 missing and 1 unexpected"),
        ("not-a-checkpoint", "cannot read DiT checkpoint"),
        ("absent", "checkpoint not found"),
        ("empty-folder", "expected a diffusers DiTTransformer2DModel folder"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, setup, message):
    path = tmp_path / "ckpt.pt"
    if setup == "wrong-config":
        torch.save(dit.DiT(dit.DiTConfig(input_size=16, hidden_size=48, depth=4, num_heads=4, num_classes=10)).state_dict(), path)
    elif setup == "missing":
        sd = dit.DiT(dit.NAMED_CONFIGS["dit-tiny"]).state_dict()
        sd["extra"] = torch.zeros(1)
        torch.save(sd, path)
    elif setup == "not-a-checkpoint":
        path.write_bytes(b"this is not a checkpoint")
    elif setup == "empty-folder":
        path = tmp_path / "folder"
        path.mkdir()
    name = "dit" if setup == "empty-folder" else "dit-tiny"
    with pytest.raises(CheckpointError) as e:
        load_model(name, checkpoint=path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_diffusers_folder_that_does_not_match_named_config(tmp_path):
    make_diffusers_dit(tmp_path / "dit")
    with pytest.raises(CheckpointError, match="expected input_size=32, got 8"):
        load_model("dit-xl-2", checkpoint=tmp_path / "dit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "dit-huge"}, "model must be one of"),
        ({"name": "dit-xl-2"}, "needs a checkpoint"),
        ({"name": "dit", "random_init": True}, "random_init needs a named config"),
    ],
)
def test_load_model_argument_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_model(**kwargs)


def test_named_configs():
    xl = dit.NAMED_CONFIGS["dit-xl-2"]
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.tokens, xl.out_channels) == (28, 1152, 16, 256, 8)
    assert dit.NAMED_CONFIGS["dit-s-2-512"].tokens == 1024
    n_params = sum(p.numel() for n, p in dit.DiT(dit.NAMED_CONFIGS["dit-s-2"]).named_parameters() if n != "pos_embed")
    assert 32e6 < n_params < 34e6  # DiT-S/2: 33M parameters


def test_pos_embed_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    theirs = get_2d_sincos_pos_embed(32, 4, base_size=4, interpolation_scale=1.0, output_type="np")
    np.testing.assert_allclose(dit.sincos_pos_embed(32, 4), theirs, atol=1e-6)
