"""FLUX end to end: the ONNX Runtime engines against diffusers' own FluxPipeline (interval 1, same
scheduler and seed) and against the PyTorch reference ClusCa; the prompt path on tiny T5/CLIP
encoders; bad run-time inputs."""

import numpy as np
import pytest
import torch

from clusca_trt.errors import ConfigError, InputError
from clusca_trt.models import flux
from clusca_trt.runtime.pipeline import Pipeline
from tests.flux_helpers import TINY, tiny_transformer
from tests.step_helpers import read_cache

STEPS = 10
PROMPTS = ["an oil painting of a couple under an umbrella", "a red cat", "the sea"]  # 3: two chunks at batch 2


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(3)
    return {
        "prompt_embeds": torch.randn(3, TINY.text_length, TINY.joint_attention_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(3, TINY.pooled_projection_dim, generator=g),
    }


@pytest.fixture(scope="module")
def pipes(flux_model, flux_engines):
    return Pipeline.load(flux_engines.directory), Pipeline.from_adapter(flux_model.adapter, flux_engines.spec)


@pytest.fixture(scope="module")
def theirs(flux_folder):
    """diffusers' FluxPipeline over the same folder: the oracle."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_latents(pipe, cfg, seed, steps, **inputs):
    with torch.no_grad():
        packed = pipe(**inputs, generator=torch.Generator().manual_seed(seed), height=cfg.height, width=cfg.width,
                      num_inference_steps=steps, max_sequence_length=cfg.text_length, output_type="latent").images
    return pipe._unpack_latents(packed, cfg.height, cfg.width, 8).numpy()


def test_interval_1_equals_diffusers_pipeline(pipes, theirs, embeds):
    engine, _ = pipes
    got = engine.generate(**embeds, seed=1, steps=STEPS, method="full")
    want = _diffusers_latents(theirs, TINY, 1, STEPS, **embeds)
    assert got.latents.shape == (3, 4, 16, 16) and got.step_counts == {"full": STEPS, "partial": 0, "forecast": 0}
    assert got.provider == "cpu"
    assert rel_err(got.latents, want) < 1e-4


def test_schnell_interval_1_equals_diffusers_pipeline(embeds):
    """No guidance input, the unshifted schnell schedule, 4 steps by default (torch backend: no export)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from clusca_trt.spec import BuildOptions

    cfg = TINY.replace(guidance_embeds=False, scheduler=dict(flux.SCHEDULER_SCHNELL))
    model = tiny_transformer(cfg, seed=5)
    adapter = flux.FluxAdapter(model, cfg)
    ours = Pipeline.from_adapter(adapter, adapter.export_spec(BuildOptions(batch=2, clusters=4)))
    got = ours.generate(**embeds, seed=2, method="full")
    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(**flux.SCHEDULER_SCHNELL), None, None, None, None, None, model)
    pipe.set_progress_bar_config(disable=True)
    want = _diffusers_latents(pipe, cfg, 2, 4, **embeds)
    assert got.step_counts["full"] == 4 and rel_err(got.latents, want) < 1e-4


@pytest.mark.parametrize("order, gamma", [(0, 0.005), (1, 0.0), (1, 0.005), (2, 0.3)])
def test_clusca_engines_equal_reference(pipes, embeds, order, gamma):
    engine, reference = pipes
    kw = dict(**embeds, seed=0, interval=3, order=order, propagation=gamma, text_propagation=gamma / 2, steps=12)
    got = engine.generate(**kw)
    want = reference.generate(**kw)
    assert got.step_counts == {"full": 6, "partial": 6, "forecast": 0}  # W = 3: steps 0, 1, 2, 5, 8, 11 are full
    assert want.backend == "torch"
    assert rel_err(got.latents, want.latents) < 1e-4


def test_torch_backend_reloads_the_build_from_its_manifest(pipes, flux_engines, embeds):
    """The build options (resolution, text length) travel back through ``load_model``."""
    engine, _ = pipes
    torch_pipe = Pipeline.load(flux_engines.directory.parent, backend="torch", select={"height": 128, "width": 128})
    assert torch_pipe.engine.backend == "torch"
    kw = dict(**embeds, seed=5, steps=6, interval=2)
    assert rel_err(torch_pipe.generate(**kw).latents, engine.generate(**kw).latents) < 1e-4


@pytest.mark.parametrize("method, kw", [("taylorseer", {"order": 2}), ("fora", {}), ("clusca", {"fresh": "nearest"})])
def test_peer_methods_equal_reference(pipes, embeds, method, kw):
    engine, reference = pipes
    got = engine.generate(**embeds, seed=2, method=method, interval=4, steps=12, **kw)
    want = reference.generate(**embeds, seed=2, method=method, interval=4, steps=12, **kw)
    assert rel_err(got.latents, want.latents) < 1e-4


def test_defaults_are_the_papers_flux_configuration(pipes, embeds):
    engine, _ = pipes
    got = engine.generate(**embeds)  # FLUX-dev: 50 steps; N=6, W=3, O=1, gamma=0.005, K as built
    c = got.config
    assert (c.method.value, c.interval, c.clusters, c.propagation, c.order, c.warmup) == ("clusca", 6, 4, 0.005, 1, 3)
    assert got.step_counts == {"full": 10, "partial": 40, "forecast": 0} and got.extra["steps"] == 50


def test_methods_differ_and_text_propagation_only_moves_the_text_cache(pipes, embeds):
    engine, _ = pipes
    runs = {m: engine.generate(**embeds, seed=0, method=m, steps=STEPS).latents for m in ("full", "clusca", "fora")}
    assert rel_err(runs["clusca"], runs["full"]) > 1e-3 and rel_err(runs["fora"], runs["clusca"]) > 1e-4
    assert rel_err(engine.generate(**embeds, seed=1, steps=STEPS).latents, runs["clusca"]) > 1e-3
    # In a partial step the text stream feeds no image token (attention and single blocks are forecast),
    # so gamma on the text tokens changes the text MLP cache and never the image.
    outs, caches = [], []
    for g in (0.0, 0.5):
        outs.append(engine.generate(**embeds, seed=0, steps=STEPS, text_propagation=g).latents)
        caches.append(read_cache(engine.engine, "mlp_txt_f0"))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(caches[0] - caches[1]).max() > 1e-4


def test_caches_stay_in_the_engine(pipes, embeds, monkeypatch):
    engine, _ = pipes
    calls = []
    real_run = engine.engine.run

    def spy(graph, feeds):
        calls.append((graph, sorted(feeds)))
        return real_run(graph, feeds)

    monkeypatch.setattr(engine.engine, "run", spy)
    engine.generate(**embeds, seed=0, steps=6, interval=2)
    fed = {name for _, names in calls for name in names}
    assert fed <= {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                   "cond_row", "taylor_coef", "forecast_coef", "gamma", "update", "init_img", "init_txt", "warm",
                   "pair", "key_img", "key_txt", "dist_weight"}
    assert [g for g, _ in calls][:9] == ["cond", "full", "full", "full", "cluster_img", "cluster_txt", "select_img",
                                         "select_txt", "partial"]


def test_prompts_end_to_end(pipes, theirs, flux_folder):
    """T5 + CLIP from the engines' source folder, engines, VAE: diffusers' images for the same seed."""
    engine, reference = pipes
    full = engine.generate(PROMPTS, seed=4, steps=STEPS, method="full")
    with torch.no_grad():
        want = theirs(prompt=PROMPTS, generator=torch.Generator().manual_seed(4), height=128, width=128,
                      num_inference_steps=STEPS, max_sequence_length=16, output_type="np").images
    assert full.images.shape == (3, 128, 128, 3) and full.extra["prompts"] == PROMPTS
    assert rel_err(full.images, want) < 1e-4
    clusca = engine.generate(PROMPTS, seed=4, steps=STEPS)
    ref = reference.generate(PROMPTS, seed=4, steps=STEPS, encoders=flux_folder)  # no source folder: told where
    assert rel_err(clusca.latents, ref.latents) < 1e-4 and rel_err(clusca.latents, full.latents) > 1e-3


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompt": "a " * 20}, InputError, "prompt 0 is 21 T5 tokens, expected at most the built text length 16"),
        ({"prompt": []}, InputError, "expected a prompt string or a non-empty list of them"),
        ({}, InputError, "expected either prompt or prompt_embeds (with pooled_prompt_embeds), got neither"),
        ({"prompt": "a cat", "prompt_embeds": np.zeros((1, 16, 32))}, InputError, "got both"),
        ({"prompt_embeds": np.zeros((1, 512, 32)), "pooled_prompt_embeds": np.zeros((1, 16))}, InputError,
         "prompt_embeds: expected float32[n, 16, 32], got [1, 512, 32]"),
        ({"prompt_embeds": np.zeros((1, 16, 32))}, InputError, "expected pooled_prompt_embeds with prompt_embeds"),
        ({"prompt_embeds": np.zeros((2, 16, 32)), "pooled_prompt_embeds": np.zeros((1, 16))}, InputError,
         "pooled_prompt_embeds: expected 2 rows like prompt_embeds, got 1"),
        ({"prompt": "a cat", "text_propagation": 1.5}, ConfigError,
         "text_propagation must be a finite number in [0.0, 1.0], got 1.5"),
        ({"prompt": "a cat", "steps": 0}, ConfigError, "steps must be an integer in 1..10000, got 0"),
    ],
)
def test_bad_run_inputs(pipes, kwargs, error, message):
    engine, _ = pipes
    with pytest.raises(error) as e:
        engine.generate(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prompts_need_the_text_encoders(pipes):
    _, reference = pipes  # built from an adapter: no checkpoint folder to find encoders in
    with pytest.raises(InputError, match="expected a FLUX pipeline folder .* for prompts"):
        reference.generate("a cat")
