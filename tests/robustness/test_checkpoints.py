"""Issue 12, cases 7 (weights) and 8: a checkpoint or config that is not what it should be is one
``CheckpointError`` line: non-tensor values, non-floating weights (float16/bfloat16 are cast to
float32, with a log line), a config.json that is null, a list, or has values of the wrong type."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from clusca_trt.errors import CheckpointError
from clusca_trt.models import load_model

from .conftest import one_line


@pytest.fixture(scope="module")
def dit_tiny_sd():
    return {k: v.clone() for k, v in load_model("dit-tiny", random_init=True, seed=1).adapter.model.state_dict().items()}


KEY = "blocks.0.attn.qkv.weight"
STATE_DICTS = {
    "int-value": (lambda sd: dict(sd, **{KEY: 5}), f"expected a tensor for {KEY}, got int"),
    "str-value": (lambda sd: dict(sd, **{KEY: "weights"}), f"expected a tensor for {KEY}, got str"),
    "dict-value": (lambda sd: dict(sd, **{KEY: {"w": sd[KEY]}}), f"expected a tensor for {KEY}, got dict"),
    "list-value": (lambda sd: dict(sd, **{KEY: [sd[KEY]]}), f"expected a tensor for {KEY}, got list"),
    "int8": (lambda sd: dict(sd, **{KEY: sd[KEY].to(torch.int8)}), f"expected floating-point weights, got {KEY} of dtype int8"),
    "bool": (lambda sd: dict(sd, **{KEY: sd[KEY] > 0}), f"expected floating-point weights, got {KEY} of dtype bool"),
    "int64": (lambda sd: dict(sd, **{KEY: sd[KEY].long()}), f"expected floating-point weights, got {KEY} of dtype int64"),
    "int-key": (lambda sd: {**sd, 3: sd[KEY]}, "expected tensor names (strings) as keys, got int 3"),
}


@pytest.mark.parametrize("case", STATE_DICTS)
def test_a_state_dict_of_the_wrong_kind_is_refused(tmp_path, dit_tiny_sd, case):
    edit, message = STATE_DICTS[case]
    path = tmp_path / "ckpt.pt"
    torch.save(edit(dict(dit_tiny_sd)), path)
    with pytest.raises(CheckpointError) as e:
        load_model("dit-tiny", checkpoint=path)
    assert message in one_line(e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_cast_and_said_so(tmp_path, dit_tiny_sd, dtype, caplog):
    path = tmp_path / "ckpt.pt"
    torch.save({k: v.to(dtype) for k, v in dit_tiny_sd.items()}, path)
    with caplog.at_level(logging.INFO, logger="clusca_trt"):
        loaded = load_model("dit-tiny", checkpoint=path)
    assert {p.dtype for p in loaded.adapter.parameters()} == {torch.float32}
    assert any("cast to float32" in r.getMessage() and str(dtype).split(".")[1] in r.getMessage() for r in caplog.records)


def _dit_folder(tmp_path, config):
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


GOOD_DIT = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 4, "attention_head_dim": 8, "in_channels": 4,
            "out_channels": 8, "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}
DIT_CONFIGS = {
    "null": ("null", "expected a JSON object, got null"),
    "list": ("[1, 2]", "expected a JSON object, got a JSON list"),
    "number": ("3", "expected a JSON object, got a JSON int"),
    "not-json": ("{not json", "is not readable JSON"),
    "str-int": (dict(GOOD_DIT, sample_size="8"), 'expected sample_size to be an integer, got "8"'),
    "bool-int": (dict(GOOD_DIT, num_layers=True), "expected num_layers to be an integer, got true"),
    "negative": (dict(GOOD_DIT, attention_head_dim=-8), "expected attention_head_dim >= 1, got -8"),
    "float-int": (dict(GOOD_DIT, patch_size=2.0), "expected patch_size to be an integer, got 2.0"),
    "eps-str": (dict(GOOD_DIT, norm_eps="1e-5"), 'expected norm_eps to be a number, got "1e-5"'),
}


@pytest.mark.parametrize("case", DIT_CONFIGS)
def test_a_diffusers_dit_config_of_the_wrong_shape_is_refused(tmp_path, case):
    config, message = DIT_CONFIGS[case]
    with pytest.raises(CheckpointError) as e:
        load_model("dit", checkpoint=_dit_folder(tmp_path, config))
    assert message in one_line(e)


@pytest.fixture(scope="module")
def flux_transformer(tmp_path_factory):
    """A flux-tiny transformer folder (random weights)."""
    folder = tmp_path_factory.mktemp("fluxt") / "transformer"
    load_model("flux-tiny", random_init=True, seed=0).adapter.model.save_pretrained(folder)
    return folder


def _pipeline(tmp_path, transformer, family="flux", edit=None, vae=None, scheduler=None):
    import shutil

    root = tmp_path / family
    shutil.copytree(transformer, root / "transformer")
    if edit is not None:
        path = root / "transformer" / "config.json"
        config = json.loads(path.read_text())
        new = edit(config)
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    if vae is not None:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps(vae))
    if scheduler is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


FLUX_CASES = {
    "null": (dict(edit=lambda c: "null"), "expected a JSON object, got null"),
    "list": (dict(edit=lambda c: "[]"), "expected a JSON object, got a JSON list"),
    "str-layers": (dict(edit=lambda c: dict(c, num_layers="2")), 'expected num_layers to be an integer, got "2"'),
    "bool-guidance": (dict(edit=lambda c: dict(c, guidance_embeds="yes")), 'expected guidance_embeds to be true or false'),
    "rope-str": (dict(edit=lambda c: dict(c, axes_dims_rope="4,6,6")), "expected axes_dims_rope to be a list of integers"),
    "negative-heads": (dict(edit=lambda c: dict(c, num_attention_heads=-2)), "expected num_attention_heads >= 0, got -2"),
    "vae-list": (dict(vae=[1]), "expected a JSON object, got a JSON list"),
    "vae-blocks": (dict(vae={"block_out_channels": 5}), "expected block_out_channels to be a list of integers, got 5"),
    "scheduler-list": (dict(scheduler=["shift"]), "expected a JSON object, got a JSON list"),
}


@pytest.mark.parametrize("case", FLUX_CASES)
def test_a_flux_folder_of_the_wrong_shape_is_refused(tmp_path, flux_transformer, case):
    kwargs, message = FLUX_CASES[case]
    root = _pipeline(tmp_path, flux_transformer, **kwargs)
    with pytest.raises(CheckpointError) as e:
        load_model("flux", checkpoint=root, height=128, width=128, text_length=16)
    assert message in one_line(e)


def test_int8_weights_in_a_diffusers_folder_are_refused(tmp_path, flux_transformer):
    from safetensors.torch import load_file, save_file

    root = _pipeline(tmp_path, flux_transformer)
    f = next((root / "transformer").glob("*.safetensors"))
    sd = load_file(str(f))
    name = sorted(sd)[0]
    sd[name] = sd[name].to(torch.int8)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError) as e:
        load_model("flux", checkpoint=root, height=128, width=128, text_length=16)
    assert f"expected floating-point weights, got {name} of dtype I8" in one_line(e)


@pytest.fixture(scope="module")
def hv_transformer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hvt") / "transformer"
    load_model("hunyuan-video-tiny", random_init=True, seed=0).adapter.model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: "null", "expected a JSON object, got null"),
        (lambda c: dict(c, num_layers="2"), 'expected num_layers to be an integer, got "2"'),
        (lambda c: dict(c, rope_axes_dim=7), "expected rope_axes_dim to be a list of integers, got 7"),
        (lambda c: dict(c, mlp_ratio="4"), 'expected mlp_ratio to be a number, got "4"'),
    ],
)
def test_a_hunyuan_video_folder_of_the_wrong_shape_is_refused(tmp_path, hv_transformer, edit, message):
    root = _pipeline(tmp_path, hv_transformer, family="hv", edit=edit)
    with pytest.raises(CheckpointError) as e:
        load_model("hunyuan-video-tiny", checkpoint=root)
    assert message in one_line(e)
