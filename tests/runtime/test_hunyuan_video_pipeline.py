"""HunyuanVideo end to end on a tiny model saved by the test: the ONNX Runtime engines against
diffusers' own HunyuanVideoPipeline (interval 1, same scheduler and seed) and against the PyTorch
reference ClusCa; the partial graph read from the ONNX file; prompts through tiny Llama/CLIP
encoders, frames through the video VAE, MP4/PNG/NPZ output and the CLI."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.errors import InputError
from clusca_trt.models import load_model
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import BuildOptions
from tests.exporters.test_export import _shapes
from tests.hunyuan_helpers import TINY
from tests.step_helpers import read_cache

STEPS = 8
OPTIONS = BuildOptions(batch=2, clusters=4, text_clusters=3, order=2)  # K_img 4 of 48 tokens, K_txt 3 of 16
PROMPTS = ["a cat on the sea", "a red dog", "the blue sky"]  # 3: two chunks at batch 2


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hv_model(hv_folder):
    return load_model("hunyuan-video-tiny", checkpoint=hv_folder)


@pytest.fixture(scope="module")
def hv_engines(hv_model, tmp_path_factory):
    from clusca_trt.exporters.build import build_engines

    return build_engines(hv_model, OPTIONS, tmp_path_factory.mktemp("hv-eng") / "hv").manifest


@pytest.fixture(scope="module")
def pipes(hv_model, hv_engines):
    return Pipeline.load(hv_engines.directory), Pipeline.from_adapter(hv_model.adapter, hv_engines.spec)


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(3, TINY.text_length)
    for i, n in enumerate((16, 5, 2)):  # full, partly padded, mostly padded prompts
        mask[i, :n] = 1
    return {
        "prompt_embeds": torch.randn(3, TINY.text_length, TINY.text_embed_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(3, TINY.pooled_projection_dim, generator=g),
        "prompt_attention_mask": mask,
    }


@pytest.fixture(scope="module")
def theirs(hv_folder):
    """diffusers' HunyuanVideoPipeline over the same folder: the oracle."""
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(str(hv_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, seed, steps, output_type="latent", **inputs):
    with torch.no_grad():
        return pipe(**inputs, generator=torch.Generator().manual_seed(seed), height=TINY.height, width=TINY.width,
                    num_frames=TINY.frames, num_inference_steps=steps, max_sequence_length=TINY.text_length,
                    output_type=output_type).frames


def test_interval_1_equals_diffusers_pipeline(pipes, theirs, embeds):
    engine, _ = pipes
    got = engine.generate(**embeds, seed=1, steps=STEPS, method="full")
    want = _diffusers(theirs, 1, STEPS, **embeds).numpy()
    assert got.latents.shape == (3, 4, 3, 8, 8) and got.step_counts == {"full": STEPS, "partial": 0, "forecast": 0}
    assert got.provider == "cpu" and got.images.shape == (3, 9, 64, 64, 3)  # frames from the video VAE
    assert rel_err(got.latents, want) < 1e-4


@pytest.mark.parametrize("order, gamma", [(0, 0.3), (1, 0.01), (2, 0.0)])
def test_clusca_engines_equal_reference(pipes, embeds, order, gamma):
    engine, reference = pipes
    kw = dict(**embeds, seed=0, interval=3, order=order, propagation=gamma, text_propagation=gamma / 2, steps=10)
    got = engine.generate(**kw)
    want = reference.generate(**kw)
    assert got.step_counts == {"full": 4, "partial": 6, "forecast": 0}  # W = 1: steps 0, 3, 6, 9 are full
    assert want.backend == "torch"
    assert rel_err(got.latents, want.latents) < 1e-4


def test_defaults_and_peer_methods_equal_reference(pipes, embeds):
    engine, reference = pipes
    embeds = {k: v[1:] for k, v in embeds.items()}  # one chunk
    got = engine.generate(**embeds, seed=2)  # the reference's defaults: 50 steps, N=5, W=1, O=1, gamma 0.01
    c = got.config
    assert (c.interval, c.clusters, c.propagation, c.order, c.warmup) == (5, 4, 0.01, 1, 1)
    assert got.step_counts == {"full": 10, "partial": 40, "forecast": 0}
    assert rel_err(got.latents, reference.generate(**embeds, seed=2).latents) < 1e-4
    ts = engine.generate(**embeds, seed=2, steps=STEPS, method="taylorseer", interval=3)
    assert rel_err(ts.latents, reference.generate(**embeds, seed=2, steps=STEPS, method="taylorseer",
                                                   interval=3).latents) < 1e-4


def test_text_cache_gets_text_outputs(pipes, embeds):
    """In a partial step the text MLP cache is written with text-stream rows only (the reference code
    writes the video MLP's outputs into it): text propagation moves the text cache, never the video."""
    engine, _ = pipes
    outs, caches, img = [], [], []
    for g in (0.0, 0.5):
        outs.append(engine.generate(**embeds, seed=0, steps=STEPS, interval=3, text_propagation=g).latents)
        caches.append(read_cache(engine.engine, "mlp_txt_f0"))
        img.append(read_cache(engine.engine, "mlp_img_f0"))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(img[0], img[1])
    assert np.abs(caches[0] - caches[1]).max() > 1e-4
    full = engine.generate(**embeds, seed=0, steps=STEPS, method="full").latents
    assert rel_err(outs[0], full) > 1e-3


# -- the graphs --------------------------------------------------------------------------------


def _mlp_inputs(model, D):
    """Shapes of the token activations entering a D -> 4D projection (MLP first layers)."""
    shapes = _shapes(model)
    found = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and sorted(shapes.get(node.input[1], ())) == [D, 4 * D]:
            x = shapes.get(node.input[0], ())
            if len(x) == 3 and x[-1] == D:  # [B, rows, D] into the first layer (not the 4D -> D second)
                found.append(x)
    return sorted(found)


def _softmax_inputs(model):
    shapes = _shapes(model)
    return sorted(shapes[n.input[0]] for n in model.graph.node if n.op_type == "Softmax")


def test_partial_graph_runs_k_rows_per_stream_and_no_attention(hv_engines):
    spec = hv_engines.spec
    B, D, T, TT, L2, L1, R = 2, 16, TINY.video_tokens, TINY.text_length, 2, 2, 1
    graphs = {n: onnx.shape_inference.infer_shapes(onnx.load(str(hv_engines.graph_path(n))))
              for n in ("full", "partial", "forecast")}
    graphs["cond"] = onnx.shape_inference.infer_shapes(onnx.load(str(hv_engines.graph_path("cond"))))
    # the token refiner (its MLP and self-attention over the text tokens) depends on the timestep and
    # the text alone: it runs in the cond graph, for the rows of cond_steps steps at once, never in a step
    rows = spec.cond_rows
    assert _mlp_inputs(graphs["cond"], D) == [(rows, TT, D)] * R
    assert _softmax_inputs(graphs["cond"]) == [(rows, 2, TT, TT)] * R
    # partial: per dual-stream block the video MLP on K = 4 rows and the text MLP on K_txt = 3 rows
    assert _mlp_inputs(graphs["partial"], D) == sorted([(B, 4, D)] * L2 + [(B, 3, D)] * L2)
    # no attention at all
    assert _softmax_inputs(graphs["partial"]) == []
    assert _mlp_inputs(graphs["forecast"], D) == []
    assert _softmax_inputs(graphs["forecast"]) == []
    # full: every token, joint attention in every block (video + text keys)
    assert _mlp_inputs(graphs["full"], D) == sorted([(B, T, D)] * L2 + [(B, TT, D)] * L2 + [(B, T + TT, D)] * L1)
    assert _softmax_inputs(graphs["full"]) == sorted([(B, 2, T + TT, T + TT)] * (L2 + L1))
    assert [t.shape for t in spec.graphs["partial"].inputs if t.name.startswith("fresh_")] == [(L2, B, 4), (L2, B, 3)]


def test_graphs_have_no_boolean_where(hv_engines):
    """ONNX Runtime has no boolean Where kernel; the masks are built with Less/And/Or instead."""
    for name in ("full", "partial", "forecast"):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(hv_engines.graph_path(name))))
        types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
        writes = ("Where", "ScatterND", "ScatterElements")
        bad = [n.name for n in model.graph.node
               if n.op_type in writes and types.get(n.output[0]) == onnx.TensorProto.BOOL]
        assert bad == [], (name, bad)


def test_diffusers_mask_form_is_what_onnxruntime_rejects(tmp_path):
    """Why the rewrite exists: diffusers' ``ones(bool).masked_fill(...)`` exports as a boolean Where."""
    import onnxruntime as ort

    class DiffusersMask(torch.nn.Module):
        def forward(self, text_mask):
            n = 4 + text_mask.shape[1]
            mask = torch.ones(text_mask.shape[0], n, dtype=torch.bool)
            length = 4 + text_mask.sum(dim=1, dtype=torch.int)
            return mask.masked_fill(torch.arange(n).unsqueeze(0) >= length.unsqueeze(1), False).float()

    path = tmp_path / "mask.onnx"
    torch.onnx.export(DiffusersMask().eval(), (torch.ones(2, 3),), dynamo=True, opset_version=18).save(str(path))
    with pytest.raises(Exception, match="Where"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# -- prompts, frames, files, CLI ----------------------------------------------------------------


def test_prompts_and_frames_end_to_end(pipes, theirs, hv_folder):
    """Llama + CLIP from the engines' source folder, engines, video VAE: diffusers' frames for the same seed."""
    engine, reference = pipes
    full = engine.generate(PROMPTS, seed=4, steps=4, method="full")
    want = _diffusers(theirs, 4, 4, output_type="np", prompt=PROMPTS)
    assert full.images.shape == want.shape == (3, 9, 64, 64, 3) and full.extra["prompts"] == PROMPTS
    assert rel_err(full.images, want) < 1e-4
    clusca = engine.generate(PROMPTS[:1], seed=4, steps=STEPS)
    ref = reference.generate(PROMPTS[:1], seed=4, steps=STEPS, encoders=hv_folder)  # no source folder: told where
    assert rel_err(clusca.latents, ref.latents) < 1e-4


def test_outputs_mp4_png_npz(pipes, embeds, tmp_path):
    import imageio.v2 as imageio

    from clusca_trt.runtime.output import write_result

    engine, _ = pipes
    result = engine.generate(**{k: v[:2] for k, v in embeds.items()}, seed=0, steps=2, method="full")
    write_result(result, tmp_path / "v.mp4")
    frames = np.stack(imageio.mimread(tmp_path / "v-1.mp4"))
    assert frames.shape == (9, 64, 64, 3) and (tmp_path / "v-0.mp4").is_file()
    write_result(result, tmp_path / "v.png")
    strip = imageio.imread(tmp_path / "v.png")
    assert strip.shape == (2 * 64, 9 * 64, 3)  # one row of frames per video
    np.testing.assert_array_equal(strip[64:, 64 * 3 : 64 * 4], (result.images[1, 3] * 255).round().astype(np.uint8))
    write_result(result, tmp_path / "v.npz")
    with np.load(tmp_path / "v.npz") as z:
        assert z["latents"].shape == (2, 4, 3, 8, 8) and z["images"].shape == (2, 9, 64, 64, 3)


def test_cli_build_and_generate(hv_folder, hv_engines, tmp_path):
    runner = CliRunner()
    built = runner.invoke(main, ["build", "--model", "hunyuan-video-tiny", "--checkpoint", str(hv_folder),
                                 "--height", "64", "--width", "64", "--frames", "9", "-K", "4", "--text-clusters", "3",
                                 "-O", "2", "-B", "2", "--out", str(hv_engines.directory.parent)])
    assert built.exit_code == 0, built.output
    assert "up to date" in built.output and "64x64x9" in built.output  # the fixture's build, found by its key
    out = tmp_path / "cat.mp4"
    gen = runner.invoke(main, ["generate", str(hv_engines.directory.parent), "--prompt", "a cat on the sea",
                               "--seed", "42", "--steps", "6", "--frames", "9", "--out", str(out)])
    assert gen.exit_code == 0, gen.output
    assert out.is_file() and "clusca (N=5, K=4, O=1, gamma=0.01), 6 steps" in gen.output
    bad = runner.invoke(main, ["build", "--model", "hunyuan-video-tiny", "--random-init", "--frames", "8",
                               "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "frames must be 4 k + 1 (1, 5, 9, ...), got 8" in bad.output


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "a " * 20}, "prompt 0 is 28 Llama tokens, expected at most the built text length 16"),
        ({}, "expected either prompt or prompt_embeds"),
        ({"prompt_embeds": np.zeros((1, 16, 16)), "pooled_prompt_embeds": np.zeros((1, 8))},
         "expected prompt_attention_mask with prompt_embeds, got none"),
        ({"prompt_embeds": np.zeros((1, 16, 16)), "pooled_prompt_embeds": np.zeros((1, 8)),
          "prompt_attention_mask": np.zeros((1, 16))},
         "prompt_attention_mask: expected 0/1 values with at least one 1"),
        ({"prompt_embeds": np.zeros((1, 256, 16)), "pooled_prompt_embeds": np.zeros((1, 8)),
          "prompt_attention_mask": np.ones((1, 16))}, "prompt_embeds: expected float32[n, 16, 16], got [1, 256, 16]"),
    ],
)
def test_bad_run_inputs(pipes, kwargs, message):
    engine, _ = pipes
    with pytest.raises(InputError) as e:
        engine.generate(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
