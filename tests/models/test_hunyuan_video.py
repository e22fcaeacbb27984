"""HunyuanVideo: the adapter's full step is diffusers' HunyuanVideoTransformer3DModel forward (bit for
bit); the masks built without boolean writes equal diffusers' own; the partial step is the spec read
block by block (each stream's MLP cache gets its own stream's rows); folders, build options and the
real configuration's cache size."""

import inspect

import pytest
import torch

from clusca_trt.context import FullContext
from clusca_trt.engines.inspect import spec_cache_bytes
from clusca_trt.errors import CheckpointError, ConfigError
from clusca_trt.models import hunyuan_video as hv
from clusca_trt.models import load_model
from clusca_trt.spec import BuildOptions
from clusca_trt.steps import graph_module
from tests.step_helpers import conditioned
from tests.conftest import make_diffusers_dit
from tests.flux_helpers import PartialStep
from tests.hunyuan_helpers import TINY, make_hunyuan_folder, tiny_transformer

MASK_LENGTHS = [(16, 16), (5, 16), (1, 3), (0, 7)]  # valid text tokens per row (a prefix, as the pipeline makes)


def _mask(lengths, T=TINY.text_length):
    mask = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def _inputs(cfg, lengths=(16, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    out = {
        "hidden_states": torch.randn(B, *cfg.latent_shape, generator=g),
        "encoder_hidden_states": torch.randn(B, cfg.text_length, cfg.text_embed_dim, generator=g),
        "encoder_attention_mask": _mask(lengths, cfg.text_length),
        "pooled_projections": torch.randn(B, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([900.0, 250.0][:B]),
    }
    if cfg.guidance_embeds:
        out["guidance"] = torch.tensor([6000.0, 1000.0][:B])
    return out


@pytest.mark.parametrize(
    "cfg",
    [TINY, TINY.replace(guidance_embeds=False, height=32, width=64, frames=5)],
    ids=["64x64x9", "32x64x5-noguide"],
)
def test_full_step_equals_diffusers_forward(cfg):
    theirs = tiny_transformer(cfg, seed=1)
    adapter = hv.HunyuanVideoAdapter(theirs, cfg)
    inputs = _inputs(cfg)
    spec = adapter.export_spec(BuildOptions(batch=2, clusters=4, order=1))
    with torch.no_grad():
        want = theirs(**inputs).sample
        ctx = FullContext(spec.slots, {}, None)
        got = adapter.forward_step(ctx, conditioned(adapter, inputs))
    assert got.shape == (2, cfg.out_channels, *cfg.latent_shape[1:])
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same modules, the same masks: bit for bit
    T, TT = cfg.video_tokens, cfg.text_length
    shapes = {"attn_img": (2, T, 16), "attn_txt": (2, TT, 16), "mlp_img": (2, T, 16), "mlp_txt": (2, TT, 16),
              "single": (2, T + TT, 16)}
    assert {k: tuple(v.shape) for k, v in ctx.new_state().items()} == {
        f"{s}_f0_{i}_out": shape for s, shape in shapes.items() for i in range(2)}
    assert {k: tuple(v.shape) for k, v in ctx.hidden_states.items()} == {"img": (2, T, 16), "txt": (2, TT, 16)}


def _captured_masks(model, inputs):
    """The masks diffusers' own forward hands to the first refiner block and the first dual-stream block."""
    seen = {}

    def spy(module, key):
        real = module.forward
        signature = inspect.signature(real)

        def forward(*args, **kwargs):
            seen[key] = signature.bind(*args, **kwargs).arguments["attention_mask"]
            return real(*args, **kwargs)

        module.forward = forward

    spy(model.context_embedder.token_refiner.refiner_blocks[0], "refiner")
    spy(model.transformer_blocks[0], "joint")
    with torch.no_grad():
        model(**inputs)
    return seen


@pytest.mark.parametrize("lengths", MASK_LENGTHS)
def test_masks_without_boolean_writes_equal_diffusers(lengths):
    """The Where rewrite is exact: the same boolean masks as diffusers' masked_fill / in-place write."""
    model = tiny_transformer(TINY, seed=0)
    inputs = _inputs(TINY, lengths)
    seen = _captured_masks(model, inputs)
    text_mask = inputs["encoder_attention_mask"]
    joint = hv.joint_attention_mask(text_mask, TINY.video_tokens)
    refiner = hv.refiner_attention_mask(text_mask)
    assert joint.dtype == seen["joint"].dtype == torch.bool and refiner.dtype == seen["refiner"].dtype == torch.bool
    assert torch.equal(joint, seen["joint"]) and torch.equal(refiner, seen["refiner"])
    assert joint[:, 0, 0].sum(1).tolist() == [TINY.video_tokens + n for n in lengths]


def test_export_spec():
    spec = hv.export_spec(TINY, BuildOptions(batch=3, clusters=5))
    assert [t.name for t in spec.model_inputs] == ["hidden_states"]
    assert [t.name for t in spec.cond_inputs] == [
        "encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "timestep", "guidance"
    ]
    assert [t.name for t in spec.cond_tensors] == ["mod_double", "mod_single", "mod_out", "context", "text_mask"]
    assert spec.graph_batch == 3 and spec.output_shape == (3, 4, 3, 8, 8)
    assert [(g.name, g.tokens, g.clusters) for g in spec.groups] == [("img", 48, 5), ("txt", 16, 5)]  # K_txt = K
    assert set(spec.graphs) == {"cond", "plain", "full", "partial", "forecast", "cluster_img", "select_img", "cluster_txt",
                               "select_txt"}
    assert [(s.name, s.layers, s.tokens, s.fresh_group) for s in spec.slots] == [
        ("attn_img", 2, 48, None), ("attn_txt", 2, 16, None), ("mlp_img", 2, 48, "img"), ("mlp_txt", 2, 16, "txt"),
        ("single", 2, 64, None),
    ]
    real = hv.NAMED_CONFIGS["hunyuan-video"]
    assert (real.latent_shape, real.video_tokens, real.hidden_size) == ((16, 17, 60, 80), 20400, 3072)


def test_real_cache_size():
    """480 x 640 x 65 frames, K=32, O=1, batch 1: 20 dual-stream blocks x (attn, mlp) x (video 20400 +
    text 256 tokens) + 40 single-stream blocks x 20656 tokens, each x 2 Taylor factors x 3072 x 4 bytes."""
    spec = hv.export_spec(hv.NAMED_CONFIGS["hunyuan-video"], BuildOptions(clusters=32, order=1))
    info = spec_cache_bytes(spec)
    want = (20 * 2 * (20400 + 256) + 40 * 20656) * 2 * 3072 * 4
    assert info["bytes"] == want == 40_611_348_480  # 37.8 GiB float32
    assert sum(s["bytes"] for s in info["slots"]) == want
    assert spec_cache_bytes(spec, bytes_per_value=2)["bytes"] == want // 2
    assert "attn_img 20x2x1x20400x3072" in info["summary"]


def test_partial_step_is_the_spec():
    """Dual-stream blocks: both attentions forecast, the video MLP on one fresh row per video cluster with
    propagation, the text MLP on one fresh row per text cluster (into the text cache); single-stream
    blocks: the joint output forecast."""
    cfg, K, KT, O, d = TINY, 3, 2, 1, 2
    model = tiny_transformer(cfg, seed=2)
    adapter = hv.HunyuanVideoAdapter(model, cfg)
    spec = adapter.export_spec(BuildOptions(batch=1, clusters=K, text_clusters=KT, order=O))
    tokens = {"img": cfg.video_tokens, "txt": cfg.text_length}
    step = PartialStep(spec, tokens, {"img": K, "txt": KT}, {"img": 0.3, "txt": 0.1}, O, d)
    inputs = _inputs(cfg, lengths=(6,))
    feeds = step.feeds(inputs, adapter)
    graph = graph_module(adapter, spec, "partial")
    with torch.no_grad():
        out, *fresh = graph(*[feeds[n] for n in graph.input_names])
        mlp_img_f0, mlp_txt_f0 = torch.stack(fresh[:2]), torch.stack(fresh[2:])

        # literal reading
        m = model
        temb, _ = m.time_text_embed(inputs["timestep"], inputs["pooled_projections"], inputs["guidance"])
        x = m.x_embedder(inputs["hidden_states"])
        c = m.context_embedder(inputs["encoder_hidden_states"], inputs["timestep"], inputs["encoder_attention_mask"])
        for i, blk in enumerate(m.transformer_blocks):
            _, _, g1, s2, c2, g2 = blk.norm1.linear(blk.norm1.silu(temb)).chunk(6, dim=1)
            _, _, tg1, ts2, tc2, tg2 = blk.norm1_context.linear(blk.norm1_context.silu(temb)).chunk(6, dim=1)
            x = x + g1[:, None] * step.forecast("attn_img", i)
            c = c + tg1[:, None] * step.forecast("attn_txt", i)
            x = x + g2[:, None] * step.mlp_stream(i, "img", x, blk.ff, blk.norm2, s2, c2)
            c = c + tg2[:, None] * step.mlp_stream(i, "txt", c, blk.ff_context, blk.norm2_context, ts2, tc2)
        h = torch.cat([x, c], dim=1)
        for j, blk in enumerate(m.single_transformer_blocks):
            gate = blk.norm.linear(blk.norm.silu(temb)).chunk(3, dim=1)[2]
            h = h + gate[:, None] * step.forecast("single", j)
        want = m.proj_out(m.norm_out(h[:, : cfg.video_tokens], temb))
        want = want.reshape(1, 3, 4, 4, 4, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(1, 4, 3, 8, 8)
    torch.testing.assert_close(mlp_img_f0, step.new["img"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp_txt_f0, step.new["txt"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_folder_layouts(tmp_path):
    make_hunyuan_folder(tmp_path / "only", transformer_only=True)
    alone = load_model("hunyuan-video-tiny", checkpoint=tmp_path / "only", frames=5, height=32)
    assert alone.decoder is None and alone.options == {"height": 32, "width": 64, "frames": 5, "text_length": 16}
    assert alone.build_name == "32x64x5" and alone.source["kind"] == "diffusers"
    assert alone.adapter.cfg.video_tokens == 2 * 2 * 4 and alone.model_config["scheduler"] == hv.SCHEDULER
    tiny = load_model("hunyuan-video-tiny", random_init=True, seed=3)
    assert tiny.source == {"kind": "random-init", "seed": 3} and tiny.build_name == "64x64x9"


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty-folder", "expected a HunyuanVideo pipeline folder (transformer/config.json) or a"),
        ("dit-folder", "expected a HunyuanVideoTransformer3DModel config in"),
        ("absent", "checkpoint not found: expected a HunyuanVideo folder"),
        ("bad-weights", "cannot load HunyuanVideo transformer"),
        ("image-to-video", "expected a text-to-video HunyuanVideo transformer (image_condition_type null)"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, setup, message):
    import json

    path = tmp_path / "ckpt"
    if setup == "empty-folder":
        path.mkdir()
    elif setup == "dit-folder":
        make_diffusers_dit(path)
    elif setup in ("bad-weights", "image-to-video"):
        make_hunyuan_folder(path, transformer_only=True)
        if setup == "bad-weights":
            (path / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
        else:
            raw = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps(dict(raw, image_condition_type="token_replace")))
    with pytest.raises(CheckpointError) as e:
        load_model("hunyuan-video-tiny", checkpoint=path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"height": 100}, "height must be a positive multiple of 16, got 100"),
        ({"frames": 64}, "frames must be 4 k + 1 (1, 5, 9, ...), got 64"),
        ({"text_length": 0}, "text length must be an integer in 1..1024, got 0"),
        ({"resolution": 512}, "HunyuanVideo build options are height, width, frames, text_length, got resolution"),
    ],
)
def test_bad_build_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError) as e:
        load_model("hunyuan-video-tiny", random_init=True, **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_clusters_beyond_tokens_are_refused():
    with pytest.raises(ConfigError, match="clusters must be <= the 16 txt tokens, got 17"):
        hv.export_spec(TINY, BuildOptions(clusters=4, text_clusters=17))
