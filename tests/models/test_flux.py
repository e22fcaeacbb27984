"""FLUX: the adapter's full step is diffusers' FluxTransformer2DModel forward; its partial step is
the spec read block by block; folders load, and bad folders and build options are one-line errors."""

import json

import pytest
import torch

from clusca_trt.context import FullContext
from clusca_trt.errors import CheckpointError, ConfigError
from clusca_trt.models import flux, load_model
from clusca_trt.spec import BuildOptions
from clusca_trt.steps import graph_module
from tests.conftest import make_diffusers_dit
from tests.step_helpers import conditioned
from tests.flux_helpers import TINY, PartialStep, make_flux_folder, tiny_transformer

SCHNELL = TINY.replace(guidance_embeds=False, scheduler=dict(flux.SCHEDULER_SCHNELL))


def _inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {
        "hidden_states": torch.randn(batch, cfg.image_tokens, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, cfg.text_length, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.9, 0.25][:batch]),
    }
    if cfg.guidance_embeds:
        out["guidance"] = torch.tensor([3.5, 1.0][:batch])
    return out


@pytest.mark.parametrize("cfg", [TINY, SCHNELL.replace(height=64, width=128)], ids=["dev-128x128", "schnell-64x128"])
def test_full_step_equals_diffusers_forward(cfg):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    theirs = tiny_transformer(cfg, seed=1)
    adapter = flux.FluxAdapter(theirs, cfg)
    inputs = _inputs(cfg)
    lh, lw = cfg.latent_size
    img_ids = FluxPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, "cpu", torch.float32)
    spec = adapter.export_spec(BuildOptions(batch=2, clusters=4, order=1))
    with torch.no_grad():
        want = theirs(**inputs, img_ids=img_ids, txt_ids=torch.zeros(cfg.text_length, 3)).sample
        ctx = FullContext(spec.slots, {}, None)
        got = adapter.forward_step(ctx, conditioned(adapter, inputs))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert set(ctx.new_state()) == {f"{s}_f0_{i}_out" for s in ("attn_img", "attn_txt", "mlp_img", "mlp_txt", "single")
                                    for i in range(2)}
    assert ctx.new_state()["single_f0_1_out"].shape == (2, cfg.text_length + cfg.image_tokens, 32)
    assert {k: tuple(v.shape) for k, v in ctx.hidden_states.items()} == {
        "img": (2, cfg.image_tokens, 32), "txt": (2, cfg.text_length, 32)
    }


def test_export_spec():
    spec = flux.FluxAdapter(tiny_transformer(SCHNELL), SCHNELL).export_spec(BuildOptions(batch=3, clusters=5))
    assert [t.name for t in spec.model_inputs] == ["hidden_states"]
    assert [t.name for t in spec.cond_inputs] == ["encoder_hidden_states", "pooled_projections", "timestep"]
    assert [t.name for t in spec.cond_tensors] == ["mod_double", "mod_single", "mod_out", "context"]
    assert spec.graph_batch == 3 and spec.output_shape == (3, 64, 16)
    assert [(g.name, g.tokens, g.clusters) for g in spec.groups] == [("img", 64, 5), ("txt", 16, 5)]  # K_txt = K
    assert spec.graphs["partial"].input("gamma").shape == (2,)  # one ratio per clustered group
    assert set(spec.graphs) == {"cond", "plain", "full", "partial", "forecast", "cluster_img", "select_img", "cluster_txt",
                               "select_txt"}
    dev = flux.FluxAdapter(tiny_transformer(TINY), TINY)
    no_txt = dev.export_spec(BuildOptions(clusters=4, text_clusters=0))
    assert "guidance" in [t.name for t in no_txt.cond_inputs] and "cluster_txt" not in no_txt.graphs
    with pytest.raises(ConfigError, match="clusters must be <= the 16 txt tokens, got 17"):
        dev.export_spec(BuildOptions(clusters=4, text_clusters=17))


def test_partial_step_is_the_spec():
    """Double blocks: both attentions forecast, the image MLP on one fresh row per image cluster with
    propagation, the text MLP likewise on text clusters; single blocks: the joint output forecast."""
    cfg, K, KT, O, d = TINY, 3, 2, 1, 2
    model = tiny_transformer(cfg, seed=2)
    spec = flux.FluxAdapter(model, cfg).export_spec(BuildOptions(batch=1, clusters=K, text_clusters=KT, order=O))
    tokens = {"img": cfg.image_tokens, "txt": cfg.text_length}
    step = PartialStep(spec, tokens, {"img": K, "txt": KT}, {"img": 0.3, "txt": 0.1}, O, d)
    inputs = _inputs(cfg, batch=1)
    adapter = flux.FluxAdapter(model, cfg)
    feeds = step.feeds(inputs, adapter)
    graph = graph_module(adapter, spec, "partial")
    with torch.no_grad():
        out, *fresh = graph(*[feeds[n] for n in graph.input_names])
        mlp_img_f0, mlp_txt_f0 = torch.stack(fresh[:2]), torch.stack(fresh[2:])

        # literal reading
        m = model
        x = m.x_embedder(inputs["hidden_states"])
        temb = m.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
        c = m.context_embedder(inputs["encoder_hidden_states"])
        for i, blk in enumerate(m.transformer_blocks):
            _, _, g1, s2, c2, g2 = blk.norm1.linear(blk.norm1.silu(temb)).chunk(6, dim=1)
            _, _, tg1, ts2, tc2, tg2 = blk.norm1_context.linear(blk.norm1_context.silu(temb)).chunk(6, dim=1)
            x = x + g1[:, None] * step.forecast("attn_img", i)
            x = x + g2[:, None] * step.mlp_stream(i, "img", x, blk.ff, blk.norm2, s2, c2)
            c = c + tg1[:, None] * step.forecast("attn_txt", i)
            c = c + tg2[:, None] * step.mlp_stream(i, "txt", c, blk.ff_context, blk.norm2_context, ts2, tc2)
        h = torch.cat([c, x], dim=1)
        for j, blk in enumerate(m.single_transformer_blocks):
            gate = blk.norm.linear(blk.norm.silu(temb)).chunk(3, dim=1)[2]
            h = h + gate[:, None] * step.forecast("single", j)
        want = m.proj_out(m.norm_out(h[:, cfg.text_length :], temb))
    torch.testing.assert_close(mlp_img_f0, step.new["img"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp_txt_f0, step.new["txt"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_folder_layouts(flux_folder, tmp_path):
    whole = load_model("flux", checkpoint=flux_folder, height=128, width=64, text_length=16)
    assert whole.source["kind"] == "diffusers" and whole.decoder == {"kind": "vae", "path": str(flux_folder / "vae")}
    assert whole.options == {"height": 128, "width": 64, "text_length": 16} and whole.build_name == "128x64"
    assert whole.model_config["scheduler"]["use_dynamic_shifting"] is True
    inner = load_model("flux", checkpoint=flux_folder / "transformer", height=128, width=64, text_length=16)
    assert inner.source["sha256"] == whole.source["sha256"] and inner.decoder == whole.decoder
    make_flux_folder(tmp_path / "only", transformer_only=True)
    alone = load_model("flux", checkpoint=tmp_path / "only")  # defaults: 1024 x 1024, 512 tokens, dev scheduler
    assert alone.decoder is None and alone.options == {"height": 1024, "width": 1024, "text_length": 512}
    assert alone.adapter.cfg.image_tokens == 4096 and alone.model_config["scheduler"] == flux.SCHEDULER_DEV


def test_a_null_out_channels_is_in_channels(tmp_path):
    """FLUX.1-dev's transformer/config.json says ``"out_channels": null``: the same as in_channels."""
    make_flux_folder(tmp_path / "only", transformer_only=True)
    path = tmp_path / "only" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(dict(raw, out_channels=None)))
    model = load_model("flux", checkpoint=tmp_path / "only", height=128, width=64, text_length=16)
    assert model.adapter.cfg.out_channels == raw["in_channels"]


def test_named_configs():
    dev, schnell = flux.NAMED_CONFIGS["flux-dev"], flux.NAMED_CONFIGS["flux-schnell"]
    assert (dev.hidden_size, dev.num_layers, dev.num_single_layers, dev.image_tokens, dev.latent_size) == (
        3072, 19, 38, 4096, (128, 128))
    assert (dev.default_steps, schnell.default_steps) == (50, 4)
    assert (schnell.text_length, schnell.guidance_embeds) == (256, False)
    tiny = load_model("flux-tiny", random_init=True, seed=3)
    assert tiny.source == {"kind": "random-init", "seed": 3} and tiny.build_name == "128x128"


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty-folder", "expected a FLUX pipeline folder (transformer/config.json) or a FluxTransformer2DModel"),
        ("dit-folder", "expected a FluxTransformer2DModel config in"),
        ("absent", "checkpoint not found: expected a FLUX folder"),
        ("bad-weights", "cannot load FLUX transformer"),
        ("named-mismatch", "does not match the config: expected in_channels=64, got 16"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, setup, message):
    path, name = tmp_path / "ckpt", "flux"
    if setup == "empty-folder":
        path.mkdir()
    elif setup == "dit-folder":
        make_diffusers_dit(path)
    elif setup in ("bad-weights", "named-mismatch"):
        make_flux_folder(path, transformer_only=True)
        if setup == "bad-weights":
            (path / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
        else:
            name = "flux-dev"
    with pytest.raises(CheckpointError) as e:
        load_model(name, checkpoint=path, height=128, width=128, text_length=16)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"height": 100}, "height must be a positive multiple of 16, got 100"),
        ({"width": 1000}, "width must be a positive multiple of 16, got 1000"),
        ({"text_length": 600}, "text length must be an integer in 1..512, got 600"),
        ({"resolution": 512}, "FLUX build options are height, width, text_length, got resolution"),
    ],
)
def test_bad_build_options_are_one_line_errors(flux_folder, options, message):
    with pytest.raises(ConfigError) as e:
        load_model("flux", checkpoint=flux_folder, **options)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "flux-dev"}, "needs a checkpoint folder"),
        ({"name": "flux", "random_init": True}, "random_init needs a named config"),
    ],
)
def test_load_model_argument_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_model(**kwargs)
