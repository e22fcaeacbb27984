"""``clusca_trt.enable(pipe)`` / ``disable(pipe)`` on tiny random-weight DiT, FLUX and HunyuanVideo
pipelines the tests build: method full equals the untouched pipeline, ClusCa equals
``Pipeline.generate`` (same settings, weights, noise), the pipelines' own features with ClusCa on,
builds (``engines=``), what is refused and what falls back, threads. fp32 on the CPU; tolerances
are relative to the largest value (``rel_err``); seeds are named in each test."""

from __future__ import annotations

import copy
import json
import logging
import threading

import numpy as np
import pytest
import torch

import clusca_trt
from clusca_trt import diffusers as cd
from clusca_trt.errors import ConfigError, EngineMismatchError
from clusca_trt.models import dit, flux, load_model
from clusca_trt.runtime import dit as dit_runtime
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.schedule import count_kinds, plan
from clusca_trt.spec import BuildOptions
from tests.diffusers_helpers import dit_latents, dit_pipeline, dit_scheduler

STEPS = 8
TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = (np.asarray(x.float() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (a, b))
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def enable():
    """``clusca_trt.enable`` that disables every pipeline it enabled when the test ends (their
    transformers are shared between tests)."""
    pipes = []

    def on(pipe, **settings):
        pipes.append(pipe)
        return clusca_trt.enable(pipe, **settings)

    yield on
    for pipe in pipes:
        if cd.enabled(pipe) is not None:
            clusca_trt.disable(pipe)


# -- the pipelines -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_base(flux_folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def flux_pipe(flux_base):
    """A FluxPipeline over the tiny FLUX folder's components (shared with other tests: not changed)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**flux_base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hv_base(hv_folder):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(str(hv_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def hv_pipe(hv_base):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**hv_base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_embeds(n: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(n, flux.NAMED_CONFIGS["flux-tiny"].text_length, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(n, 16, generator=g)}


def hv_embeds(n: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 16)
    for i in range(n):
        mask[i, : 16 - 5 * i] = 1  # a full and a partly padded prompt
    return {"prompt_embeds": torch.randn(n, 16, 16, generator=g), "pooled_prompt_embeds": torch.randn(n, 8, generator=g),
            "prompt_attention_mask": mask}


def run_dit(pipe, seed=0, steps=STEPS, labels=(3, 7), **kw):
    return dit_latents(pipe, list(labels), seed=seed, steps=steps, **kw)


def run_flux(pipe, seed=0, steps=STEPS, embeds=None, **kw):
    kw.setdefault("output_type", "latent")
    with torch.no_grad():
        out = pipe(**(embeds or flux_embeds()), generator=torch.Generator().manual_seed(seed), height=128, width=128,
                   num_inference_steps=steps, **kw).images
    if kw["output_type"] != "latent":
        return out
    return pipe._unpack_latents(out, 128, 128, 8)


def run_hv(pipe, seed=0, steps=STEPS, embeds=None, **kw):
    kw.setdefault("output_type", "latent")
    with torch.no_grad():
        return pipe(**(embeds or hv_embeds()), generator=torch.Generator().manual_seed(seed), height=64, width=64,
                    num_frames=9, num_inference_steps=steps, max_sequence_length=16, **kw).frames


RUN = {"dit": run_dit, "flux": run_flux, "hunyuan-video": run_hv}


@pytest.fixture
def pipeline(request, flux_pipe, hv_pipe):
    """(family, a fresh pipeline of it) for ``indirect`` parametrization by family name."""
    return request.param, {"dit": dit_pipeline, "flux": lambda: flux_pipe, "hunyuan-video": lambda: hv_pipe}[
        request.param]()


FAMILIES = pytest.mark.parametrize("pipeline", ["dit", "flux", "hunyuan-video"], indirect=True)


# -- the targets ---------------------------------------------------------------------------------


@FAMILIES
def test_full_equals_the_untouched_pipeline_and_disable_restores_it(pipeline, enable):
    """method full (our step modules, every step plain) gives the untouched pipeline's output to 1e-4;
    after disable the pipeline is the untouched one again, bit for bit; enable works again after."""
    family, pipe = pipeline
    run, cls = RUN[family], type(pipe)
    want = run(pipe, seed=1)
    handle = enable(pipe, method="full")
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    got = run(pipe, seed=1)
    assert handle.last_call.step_counts == {"full": STEPS, "partial": 0, "forecast": 0}
    assert handle.last_call.served == STEPS and handle.last_call.fallback is None
    assert rel_err(got, want) < TOL
    clusca_trt.disable(pipe)
    assert type(pipe) is cls and cd.enabled(pipe) is None
    assert torch.equal(run(pipe, seed=1), want)
    again = enable(pipe, interval=3)
    run(pipe, seed=1)
    assert again.last_call.step_counts["full"] < STEPS  # ClusCa really ran the second time


def _dit_twin(pipe, monkeypatch, seed, batch, **settings):
    """``Pipeline.generate`` over the same weights with the DiTPipeline's initial noise for ``seed``."""
    adapter = dit.DiTAdapter(dit.from_diffusers_module(copy.deepcopy(pipe.transformer)))
    opts = BuildOptions(batch=batch, clusters=settings.pop("clusters"), order=settings.pop("built_order"))
    twin = Pipeline.from_adapter(adapter, adapter.export_spec(opts))
    noise = torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).numpy()
    monkeypatch.setattr(dit_runtime, "initial_noise", lambda keys, shape: noise[[k[1] for k in keys]])
    return twin


@pytest.mark.parametrize("method, settings", [
    ("clusca", dict(interval=3, clusters=4, order=2, propagation=0.01)),
    ("clusca", dict(interval=4, clusters=2, order=1, propagation=0.0, fresh="nearest")),
    ("clusca", dict(interval=3, clusters=4, order=2, propagation=0.2, update="paper", pair=False)),
    ("clusca", dict(interval=3, clusters=4, order=2, propagation=0.2, update="residual", correction=(0.0, 1.0))),
    ("taylorseer", dict(interval=3, order=2)),
])
def test_dit_clusca_equals_pipeline_generate(monkeypatch, enable, method, settings):
    """Same settings, weights and noise (the pipeline's generator's): the DiTPipeline with ClusCa
    enabled equals ``Pipeline.generate`` to 1e-4 (seed 5; ClusCa's draws: key (0, j) for sample j)."""
    pipe = dit_pipeline(seed=0)
    labels = [3, 7]
    built = dict(clusters=settings.get("clusters", 0), built_order=settings.get("order", 2))
    twin = _dit_twin(pipe, monkeypatch, 5, len(labels), **built)
    handle = enable(pipe, method=method, **settings)
    got = run_dit(pipe, seed=5, labels=labels)
    want = twin.generate(labels, seed=0, steps=STEPS, method=method, cfg_scale=4.0, **settings)
    assert handle.last_call.step_counts == want.step_counts
    assert handle.last_call.step_counts["full"] < STEPS
    assert rel_err(got, want.latents) < TOL
    assert rel_err(got, run_dit(dit_pipeline(seed=0), seed=5, labels=labels)) > 1e-4  # not the untouched result


@pytest.mark.parametrize("family", ["flux", "hunyuan-video"])
def test_flux_and_hunyuan_clusca_equal_pipeline_generate(family, flux_pipe, hv_pipe, flux_model, hv_folder, enable):
    """FLUX and HunyuanVideo: the enabled pipeline equals ``Pipeline.generate`` (same weights, embeddings,
    seed 2 for the noise and ClusCa's keys) to 1e-4."""
    settings = dict(interval=3, clusters=4, order=2, propagation=0.01, text_propagation=0.05)
    if family == "flux":
        pipe, model, embeds, run = flux_pipe, flux_model, flux_embeds(), run_flux
    else:
        pipe, model, embeds, run = hv_pipe, load_model("hunyuan-video-tiny", checkpoint=hv_folder), hv_embeds(), run_hv
    handle = enable(pipe, seed=2, **settings)
    got = run(pipe, seed=2, embeds=embeds)
    spec = model.adapter.export_spec(BuildOptions(batch=2, clusters=4, text_clusters=4, order=2))
    want = Pipeline.from_adapter(model.adapter, spec).generate(**embeds, seed=2, steps=STEPS, **settings)
    assert handle.last_call.step_counts == want.step_counts and want.step_counts["partial"] > 0
    assert rel_err(got, want.latents) < TOL


# -- the pipelines' own features, with ClusCa on ---------------------------------------------------


def test_generator_seeds_are_the_pipelines(enable):
    pipe = dit_pipeline()
    enable(pipe, interval=3, clusters=4)
    a, b, c = run_dit(pipe, seed=1), run_dit(pipe, seed=1), run_dit(pipe, seed=2)
    assert torch.equal(a, b) and rel_err(a, c) > 1e-2


def test_guidance_off_runs_the_rows_as_they_come(enable):
    """guidance_scale 1: DiTPipeline sends one row per sample (no null class): still served."""
    pipe = dit_pipeline()
    want = run_dit(pipe, guidance_scale=1.0, labels=(3, 7, 1))
    handle = enable(pipe, method="full")
    assert rel_err(run_dit(pipe, guidance_scale=1.0, labels=(3, 7, 1)), want) < TOL  # 3 rows in a graph batch of 4
    clusca_trt.disable(pipe)
    handle = enable(pipe, interval=3, clusters=4)
    run_dit(pipe, guidance_scale=1.0, labels=(3, 7, 1))
    assert handle.last_call.served == STEPS and handle.last_call.step_counts["partial"] > 0


def test_another_scheduler_and_step_count_per_call(enable):
    """The pipeline's scheduler (DPM-Solver here) runs; ClusCa's plan follows each call's steps."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = dit_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(dit_scheduler().config)
    want = run_dit(pipe, steps=6)
    handle = enable(pipe, method="full")
    assert rel_err(run_dit(pipe, steps=6), want) < TOL
    clusca_trt.disable(pipe)
    handle = enable(pipe, interval=3, clusters=4)
    for steps in (6, 11):
        run_dit(pipe, steps=steps)
        expect = count_kinds(plan(steps, handle.last_call.config, 2))
        assert handle.last_call.steps == steps == handle.last_call.served
        assert handle.last_call.step_counts == {k.value: v for k, v in expect.items()}


def test_num_images_per_prompt(flux_pipe, flux_model, enable):
    """Two images of one prompt (through the tiny T5 and CLIP encoders): sample j is
    Pipeline.generate's sample j (key (4, j) and the pipeline's noise of seed 4)."""
    prompt = {"prompt": "an oil painting of a couple under an umbrella", "max_sequence_length": 16}
    enable(flux_pipe, seed=4, interval=3, clusters=4, order=2)
    got = run_flux(flux_pipe, seed=4, embeds=prompt, num_images_per_prompt=2)
    assert got.shape == (2, 4, 16, 16) and rel_err(got[0], got[1]) > 1e-3
    with torch.no_grad():
        embeds, pooled, _ = flux_pipe.encode_prompt(prompt=prompt["prompt"], prompt_2=None, num_images_per_prompt=2,
                                                    max_sequence_length=16)
    spec = flux_model.adapter.export_spec(BuildOptions(batch=2, clusters=4, text_clusters=4, order=2))
    want = Pipeline.from_adapter(flux_model.adapter, spec).generate(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, seed=4, steps=STEPS, interval=3, order=2)
    assert rel_err(got, want.latents) < TOL


def test_callback_on_step_end(flux_pipe, enable):
    """The callback sees every step; what it changes (the latents, the prompt embeddings) is what the
    next step gets: method full equals the untouched pipeline with the same callback."""
    seen = []

    def callback(pipe, i, t, kw):
        seen.append(i)
        if i == 2:
            return {"latents": kw["latents"] * 0.5, "prompt_embeds": kw["prompt_embeds"].flip(0)}
        return {}

    inputs = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    want = run_flux(flux_pipe, **inputs)
    handle = enable(flux_pipe, method="full")
    seen.clear()
    got = run_flux(flux_pipe, **inputs)
    assert seen == list(range(STEPS)) and rel_err(got, want) < TOL
    clusca_trt.disable(flux_pipe)
    handle = enable(flux_pipe, interval=3, clusters=4)
    seen.clear()
    changed = run_flux(flux_pipe, **inputs)
    assert seen == list(range(STEPS)) and handle.last_call.served == STEPS
    assert rel_err(changed, run_flux(flux_pipe)) > 1e-2  # the callback's changes took effect


def test_img2img_plans_from_its_first_timestep(flux_base, enable):
    """FluxImg2ImgPipeline at strength 0.5 runs the last 4 of 8 timesteps: ClusCa plans those 4 (found
    from the first call's timestep), and method full equals the untouched pipeline."""
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    pipe = FluxImg2ImgPipeline(**flux_base.components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), np.uint8))
    kw = dict(image=image, strength=0.5)
    want = run_flux(pipe, **kw)
    handle = enable(pipe, method="full")
    assert rel_err(run_flux(pipe, **kw), want) < TOL
    assert handle.last_call.steps == handle.last_call.served == STEPS // 2
    clusca_trt.disable(pipe)
    handle = enable(pipe, interval=2, warmup=1, clusters=4)
    run_flux(pipe, **kw)
    assert handle.last_call.step_counts == {"full": 2, "partial": 2, "forecast": 0}  # steps 0, 2 of the 4


@pytest.mark.parametrize("output_type", ["np", "pil", "pt"])
def test_output_types(flux_pipe, enable, output_type):
    want = run_flux(flux_pipe, output_type=output_type)
    enable(flux_pipe, method="full")
    got = run_flux(flux_pipe, output_type=output_type)
    if output_type == "pil":
        assert [im.size for im in got] == [im.size for im in want]
        got, want = np.stack([np.asarray(im, np.float64) for im in got]), np.stack([np.asarray(im, np.float64) for im in want])
        assert np.abs(got - want).max() <= 1  # 8-bit rounding
    else:
        assert type(got) is type(want) and got.shape == want.shape and rel_err(got, want) < TOL


def test_threads_each_get_their_own_result(enable):
    """Two threads call one enabled pipeline at once (the calls take turns): each result equals the
    same call alone (seeds 1 and 2, labels differ)."""
    pipe = dit_pipeline()
    enable(pipe, interval=3, clusters=4)
    jobs = [((3, 7), 1), ((1,), 2)]

    def images(labels, seed):
        return pipe(class_labels=list(labels), generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                    output_type="pt").images

    alone = [images(*j) for j in jobs]
    got = [[] for _ in jobs]
    threads = [threading.Thread(target=lambda i=i: [got[i].append(images(*jobs[i])) for _ in range(2)])
               for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(jobs)):
        assert len(got[i]) == 2 and all(torch.equal(g, alone[i]) for g in got[i])


def test_transformer_outside_a_pipeline_call_is_untouched(enable):
    pipe = dit_pipeline()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([3, 1000])
    with torch.no_grad():
        want = pipe.transformer(x, timestep=t, class_labels=y).sample
        enable(pipe, interval=3)
        assert torch.equal(pipe.transformer(x, timestep=t, class_labels=y).sample, want)


def test_pipe_to_another_dtype_after_enable(enable):
    """pipe.to(bfloat16) after enable: the step modules follow the transformer."""
    pipe = dit_pipeline()
    handle = enable(pipe, interval=3, clusters=4)
    run_dit(pipe)
    assert "fp32" in handle.last_call.engine
    pipe.to(torch.bfloat16)
    out = run_dit(pipe)
    assert "bf16" in handle.last_call.engine and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# -- builds (engines=) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_build(tmp_path_factory):
    """A DiTPipeline saved to a folder and a build (batch 2, K 4, O 2) of its transformer."""
    from clusca_trt.exporters.build import build_engines

    root = tmp_path_factory.mktemp("dit-pipe")
    dit_pipeline(seed=0, folder=root / "pipe")
    loaded = load_model("dit", checkpoint=root / "pipe" / "transformer")
    manifest = build_engines(loaded, BuildOptions(batch=2, clusters=4, order=2), root / "eng").manifest
    return root / "pipe", manifest


def _load_dit(folder):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_dit_build_equals_pipeline_load_generate(dit_build, monkeypatch, enable, backend):
    """A build of the pipeline's transformer, one sample in a batch-2 build (padded): equals the
    build's own ``Pipeline.load(...).generate`` to 1e-4 (noise of seed 6)."""
    folder, manifest = dit_build
    pipe = _load_dit(folder)
    handle = enable(pipe, engines=manifest.directory, backend=backend, interval=3, propagation=0.01)
    got = run_dit(pipe, seed=6, labels=(5,))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(6)).numpy()
    monkeypatch.setattr(dit_runtime, "initial_noise", lambda keys, shape: noise[[k[1] for k in keys]])
    want = Pipeline.load(manifest.directory).generate([5], seed=0, steps=STEPS, interval=3, propagation=0.01,
                                                      cfg_scale=4.0)
    assert handle.last_call.engine.startswith(backend) and handle.last_call.step_counts == want.step_counts
    assert rel_err(got, want.latents) < TOL


def test_a_build_of_other_weights_is_refused(dit_build, tmp_path):
    folder, manifest = dit_build
    other = dit_pipeline(seed=1, folder=tmp_path / "other")
    with pytest.raises(EngineMismatchError, match="built from other weights") as e:
        clusca_trt.enable(other, engines=manifest.directory)
    assert "\n" not in str(e.value)
    assert cd.enabled(other) is None and type(other).__name__ == "DiTPipeline"
    assert not getattr(other.transformer, "_diffusers_hook", None) or not other.transformer._diffusers_hook.hooks


def test_a_build_takes_at_most_its_batch(dit_build, enable):
    folder, manifest = dit_build
    pipe = _load_dit(folder)
    enable(pipe, engines=manifest.directory)
    with pytest.raises(EngineMismatchError, match="at most 2 samples per call .* got 3; rebuild it with"):
        run_dit(pipe, labels=(1, 2, 3))
    assert run_dit(pipe, labels=(1, 2)).shape == (2, 4, 8, 8)  # the pipeline still works


def test_a_flux_build_of_another_resolution_is_refused(flux_pipe, flux_engines, enable):
    enable(flux_pipe, engines=flux_engines.directory.parent)  # the directory of FLUX builds: one per resolution
    run_flux(flux_pipe)
    with torch.no_grad(), pytest.raises(EngineMismatchError, match="none for height=256"):
        flux_pipe(**flux_embeds(), height=256, width=256, num_inference_steps=2, output_type="latent")


def test_build_weights_are_compared_where_there_is_no_folder():
    """A build from random weights: the pipeline's transformer must have those weights (seed 3 vs 4)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from clusca_trt.engines.manifest import Manifest
    from clusca_trt.families import FLUX

    from clusca_trt.models import load_model

    cfg = flux.NAMED_CONFIGS["flux-tiny"]
    options = {"height": 128, "width": 128, "text_length": 16}
    built = load_model("flux-tiny", random_init=True, seed=3, **options)  # the architecture a build records
    model = {"name": "flux-tiny", "family": "flux", "source": {"kind": "random-init", "seed": 3},
             "options": options, "config": json.loads(json.dumps(built.model_config, default=str))}
    manifest = Manifest({"model": model}, directory="engines/flux-tiny")
    for seed, ok in ((3, True), (4, False)):
        t = flux.init_random(cfg, seed)
        pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, None, None, t)
        owner = type("Owner", (), dict(transformer=t, pipe=pipe, family=FLUX, binding=flux.PIPELINE))()
        if ok:
            cd.check_build_weights(manifest, owner, {})
        else:
            with pytest.raises(EngineMismatchError, match="random weights .seed 3., got a transformer whose"):
                cd.check_build_weights(manifest, owner, {})


# -- what falls back, what is refused ---------------------------------------------------------------


def _one_warning(caplog, *words):
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "clusca_trt.diffusers"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    for w in words:
        assert w in warnings[0].getMessage()


def test_true_cfg_falls_back_with_one_warning(flux_pipe, enable, caplog):
    """A negative prompt with true_cfg_scale > 1: two transformer calls per step ("uncond"): the
    original transformer from there on, one warning; the result is the untouched pipeline's."""
    neg = {"negative_" + k: v for k, v in flux_embeds(seed=9).items()}
    want = run_flux(flux_pipe, true_cfg_scale=2.0, **neg)
    handle = enable(flux_pipe, interval=3, clusters=4)
    with caplog.at_level(logging.WARNING):
        got = run_flux(flux_pipe, true_cfg_scale=2.0, **neg)
    _one_warning(caplog, "uncond")
    assert handle.last_call.served == 1 and "uncond" in handle.last_call.fallback
    assert rel_err(got, want) < TOL  # step 0's conditional call was a full step: the model itself
    run_flux(flux_pipe)
    assert handle.last_call.fallback is None and handle.last_call.served == STEPS  # the next call is served


def test_changed_attention_processors_fall_back(flux_base, enable, caplog):
    from diffusers import FluxPipeline
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe = FluxPipeline(**dict(flux_base.components, transformer=copy.deepcopy(flux_base.transformer)))
    pipe.set_progress_bar_config(disable=True)
    handle = enable(pipe, interval=3, clusters=4)
    pipe.transformer.set_attn_processor(FluxAttnProcessor())
    want = run_flux(flux_base)
    with caplog.at_level(logging.WARNING):
        got = run_flux(pipe)
    _one_warning(caplog, "attention processors")
    assert handle.last_call.served == 0 and rel_err(got, want) < 1e-6


def test_controlnet_residuals_fall_back(flux_base, enable, caplog):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    torch.manual_seed(0)
    cn = FluxControlNetModel(in_channels=16, num_layers=1, num_single_layers=0, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                             guidance_embeds=True, axes_dims_rope=[4, 6, 6]).eval()
    with torch.no_grad():
        for p in cn.parameters():
            p.normal_(0, 0.05)
    pipe = FluxControlNetPipeline(**flux_base.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))
    kw = dict(control_image=image, controlnet_conditioning_scale=0.8)
    want = run_flux(pipe, **kw)
    handle = enable(pipe, interval=3, clusters=4)
    with caplog.at_level(logging.WARNING):
        got = run_flux(pipe, **kw)
    _one_warning(caplog, "controlnet_block_samples")
    assert handle.last_call.served == 0 and rel_err(got, want) < 1e-6


@pytest.mark.parametrize("family, change", [("dit", "fused"), ("flux", "fused"), ("flux", "injected")])
def test_a_lora_after_enable_is_refused_until_enabled_again(family, change, flux_base, enable):
    """Weights changed in place (a fused LoRA) or modules replaced (a LoRA loaded: new parameters)
    after enable: the next call is refused in one line; disable and enable again serve it (method
    full then equals the untouched pipeline with the LoRA)."""
    from diffusers import FluxPipeline

    if family == "dit":
        pipe, run = dit_pipeline(), run_dit
    else:
        pipe = FluxPipeline(**dict(flux_base.components, transformer=copy.deepcopy(flux_base.transformer)))
        pipe.set_progress_bar_config(disable=True)
        run = run_flux
    enable(pipe, interval=3, clusters=4)
    run(pipe)
    block = pipe.transformer.transformer_blocks[0]
    ff = block.ff.net[2]
    with torch.no_grad():
        if change == "fused":
            ff.weight.add_(0.01)
        else:
            block.ff.net[2] = LoraLinear(ff)
    with pytest.raises(EngineMismatchError, match="after clusca_trt.enable .*disable.*again") as e:
        run(pipe)
    assert "\n" not in str(e.value)
    clusca_trt.disable(pipe)
    want = run(pipe)
    enable(pipe, method="full")
    assert rel_err(run(pipe), want) < TOL


class LoraLinear(torch.nn.Module):
    """What PEFT makes of a Linear when a LoRA is loaded: the base layer plus a low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_what_enable_refuses(enable):
    from diffusers import DiTPipeline
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = dit_pipeline()
    for bad, match in [
        (dict(method="fast"), "method must be one of"),
        (dict(interval=0), "interval must be"),
        (dict(propagation=2.0), "propagation"),
        (dict(clusters=17), "clusters must be <= the 16 image tokens"),
        (dict(backend="onnxruntime"), "pass engines=DIR"),
        (dict(device="cuda"), "expected device cpu"),
        (dict(precision="bf16"), "expected precision fp32"),
        (dict(text_propagation=0.1), "text_propagation applies to"),
        (dict(seed=-1), "seed must be"),
    ]:
        with pytest.raises(ConfigError, match=match):
            clusca_trt.enable(pipe, **bad)
        assert cd.enabled(pipe) is None and type(pipe).__name__ == "DiTPipeline"
    enable(pipe)
    with pytest.raises(ConfigError, match="got one with it enabled"):
        clusca_trt.enable(pipe)
    sharing = DiTPipeline(**pipe.components)  # another pipeline over the same transformer (as from_pipe makes)
    with pytest.raises(ConfigError, match="enabled through another pipeline"):
        clusca_trt.enable(sharing)
    clusca_trt.disable(pipe)
    with pytest.raises(ConfigError, match="got one without"):
        clusca_trt.disable(pipe)
    cached = dit_pipeline()
    apply_first_block_cache(cached.transformer, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ConfigError, match="without diffusers cache hooks"):
        clusca_trt.enable(cached)
    with pytest.raises(ConfigError, match="expected a pipeline whose transformer is a DiTTransformer2DModel or"):
        clusca_trt.enable(type("P", (), {"transformer": torch.nn.Linear(2, 2), "scheduler": None})())


# -- pure pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, guided, mult, batch, index, back", [
    (4, True, 2, 2, [0, 1, 2, 3], [0, 1, 2, 3]),  # exactly the build
    (2, True, 2, 2, [0, 0, 1, 1], [0, 2]),  # one sample in a batch of 2: each half padded with its own row
    (6, True, 2, 3, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    (3, False, 2, 2, [0, 1, 2, 0], [0, 1, 2]),  # no guidance: rows as they come
    (1, False, 1, 2, [0, 0], [0]),  # FLUX: one prompt in a batch of 2
])
def test_row_map(rows, guided, mult, batch, index, back):
    m = cd.row_map(rows, guided, mult, batch)
    assert m.index.tolist() == index and m.back.tolist() == back
    assert cd.samples(rows, guided, mult) <= batch


def test_row_map_refuses_more_rows_than_the_graph():
    with pytest.raises(ConfigError, match="at most 2 samples"):
        cd.row_map(6, True, 2, 2)
