"""Peers side by side on one DiT, same weights, same noise, same DDIM sampler with guidance:

  (a) diffusers ``DiTTransformer2DModel``, eager PyTorch, no cache (the reference of every error)
  (b) diffusers' own cache hooks that apply to it (TaylorSeer, FirstBlockCache, MagCache, PAB, ...;
      the ones that do not apply are listed with the reason); diffusers eager in bf16 (CPU
      autocast); cache-dit's DBCache with its TaylorSeer calibrator (``cache_peers``)
  (c) our PyTorch reference ClusCa (``Pipeline.from_adapter``: the step modules, eager)
  (d) our engines (ONNX Runtime), full compute
  (e) our engines, ClusCa (and TaylorSeer / FORA from the same engines), with each update rule of
      ``--updates`` (the paper's, the residual rules, guidance rows paired; one engine directory)
  (f) our engines on OpenVINO (bf16 where the CPU has bf16 units, else fp32): full and ClusCa
      (``openvino_rows``; ``--no-openvino`` leaves them out)

    .venv/bin/python benchmarks/peers.py                                   # DiT-B/2 size, the defaults below
    .venv/bin/python benchmarks/peers.py --size tiny --steps 10 --repeats 1  # a quick check

Default: DiT-B/2 size (12 blocks, 768 wide, 12 heads), random weights, 256 tokens, one sample
(CFG: batch 2), 50 DDIM steps, cfg 1.5, N=5, K=16, O=2, gamma=0.005. Our DiT is loaded from the
diffusers folder this script saves, so every method runs the same weights.

Timing: every method runs once on a short schedule first (warm-up), then ``--repeats`` rounds
run every method once, in an order rotated per round; a method's time is the median of its
rounds. Error: relative L2 error and PSNR (peak = the reference's value range) of the final
latent against (a). Writes ``peers.md``, ``peers.json`` and ``peers.png`` to ``--out``.
Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.exporters.build import build_engines  # noqa: E402
from clusca_trt.engines.manifest import library_versions  # noqa: E402
from clusca_trt.models import load_model  # noqa: E402
from clusca_trt.runtime import dit as dit_runtime  # noqa: E402
from clusca_trt.analysis.bench import device_name  # noqa: E402
from clusca_trt.runtime.metrics import latent_psnr  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.spec import BuildOptions  # noqa: E402

log = logging.getLogger("peers")

SIZES = {  # heads, head dim, layers, latent side
    "b2": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12, sample_size=32),
    "tiny": dict(num_attention_heads=4, attention_head_dim=8, num_layers=2, sample_size=16),
}
BLOCK = r"transformer_blocks\.\d+\."


@dataclass
class Entry:
    key: str
    label: str
    group: str  # reference, diffusers, ours-torch, ours-engines
    settings: str
    sample: object  # (steps) -> final latent [1, C, H, W]
    seconds: list[float] = field(default_factory=list)
    latent: np.ndarray | None = None


# ------------------------------------------------------------------------------------------
# the model


def random_diffusers_dit(size: str, seed: int):
    """A diffusers DiT of ``SIZES[size]`` with random weights, per-block conditioning embeddings tied
    (as in every converted DiT checkpoint, and as our loader requires)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000, **SIZES[size])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4.0))
        first = m.transformer_blocks[0].norm1.emb
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(first.state_dict())
    return m.eval()


def make_diffusers_dit(folder: Path, size: str, seed: int) -> None:
    """``random_diffusers_dit`` saved to ``folder`` (kept where it is already there)."""
    if (folder / "config.json").is_file():
        log.info("reusing %s", folder)
        return
    random_diffusers_dit(size, seed).save_pretrained(folder)


def dit_pipeline(transformer):
    """A ``DiTPipeline`` over ``transformer`` with a tiny VAE and diffusers' DDIM set up as DiT samples."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    vae = AutoencoderKL(latent_channels=4, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=2).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_diffusers(folder: Path):
    from diffusers import DiTTransformer2DModel

    with contextlib.redirect_stderr(io.StringIO()):
        return DiTTransformer2DModel.from_pretrained(str(folder)).eval()


class DiffusersSampler:
    """DDIM sampling (our sampler, so every method shares it) over a diffusers model call."""

    def __init__(self, model, args, on_reset=None):
        self.model, self.args, self.on_reset = model, args, on_reset
        self.t = 0.0

    def current_timestep(self) -> float:
        return self.t

    def __call__(self, steps: int) -> np.ndarray:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        if self.on_reset:
            self.on_reset()
        a = self.args
        cfg = self.model.config

        def make(rng):
            def denoise(step, feeds):
                # what a CacheMixin pipeline's ``with transformer.cache_context("cond", ...)`` sets; the
                # DiT class is no CacheMixin, so it is set the same way here
                self.t = float(feeds["t"][0])
                _set_cache_context(self.model, CacheContext("cond", step_index=step, num_inference_steps=steps,
                                                            timestep=self.t))
                try:
                    with torch.inference_mode():
                        x, t, y = (torch.from_numpy(feeds[k]) for k in ("x", "t", "y"))
                        return self.model(x, timestep=t, class_labels=y).sample.numpy()
                finally:
                    _set_cache_context(self.model, None)

            return denoise

        side = cfg.sample_size
        return dit_runtime.sample(make, 1, (cfg.in_channels, side, side), [a.label], a.seed, steps, "ddim",
                                  a.cfg_scale, cfg.num_embeds_ada_norm)


# ------------------------------------------------------------------------------------------
# diffusers' cache hooks


def diffusers_hooks(folder: Path, args) -> tuple[list[Entry], dict[str, str]]:
    """(entries for the hooks that run on DiT, {hook: why not} for the others)."""
    from diffusers import hooks as H

    n, steps = args.interval, args.steps
    entries, skipped = [], {}

    def attempt(key, label, settings, apply, on_reset=None, check=None):
        model = load_diffusers(folder)
        sampler = DiffusersSampler(model, args, on_reset)
        try:
            apply(model, sampler)
            if check is not None:
                check(model)
            sampler(min(3, steps))  # does it run at all?
        except Exception as e:  # a hook that does not apply: report why
            skipped[label] = f"{type(e).__name__}: {e}".splitlines()[0][:240]
            log.warning("%s does not run on DiT: %s", label, skipped[label])
            return
        entries.append(Entry(key, label, "diffusers", settings, sampler))

    def hooked(model, hook_name):
        count = sum(1 for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
                    and m._diffusers_hook.get_hook(hook_name) is not None)
        if count == 0:
            raise ValueError(f"its default module patterns hook no module of DiTTransformer2DModel ({hook_name})")

    # TaylorSeer: the documented default patterns ("^transformer_blocks.*attn", fullmatch) miss DiT's attn1
    attempt("ts_default", "diffusers TaylorSeer (default patterns)", "", lambda m, s: H.apply_taylorseer_cache(
        m, H.TaylorSeerCacheConfig(cache_interval=n, max_order=2, taylor_factors_dtype=torch.float32)),
        check=lambda m: hooked(m, "taylorseer_cache"))
    attempt("ts", "diffusers TaylorSeer", f"attn1 + ff cached, interval {n}, O=2, warm-up 2, fp32",
            lambda m, s: H.apply_taylorseer_cache(m, H.TaylorSeerCacheConfig(
                cache_interval=n, disable_cache_before_step=2, max_order=2, taylor_factors_dtype=torch.float32,
                cache_identifiers=[BLOCK + "attn1", BLOCK + "ff"])),
            check=lambda m: hooked(m, "taylorseer_cache"))
    attempt("ts_lite", "diffusers TaylorSeer lite", f"interval {n}", lambda m, s: H.apply_taylorseer_cache(
        m, H.TaylorSeerCacheConfig(cache_interval=n, use_lite_mode=True, taylor_factors_dtype=torch.float32)),
        check=lambda m: hooked(m, "taylorseer_cache"))
    for thr in args.fbc_thresholds:
        attempt(f"fbc{thr}", f"diffusers FirstBlockCache {thr}", f"threshold {thr}",
                lambda m, s, thr=thr: H.apply_first_block_cache(m, H.FirstBlockCacheConfig(threshold=thr)))
    for skip in (2, 3):
        attempt(f"pab{skip}", f"diffusers PAB {skip}", f"spatial attention skip range {skip}, t in (100, 800)",
                lambda m, s, skip=skip: H.apply_pyramid_attention_broadcast(m, H.PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=skip, current_timestep_callback=s.current_timestep)))

    ratios = calibrate_magcache(folder, args, skipped)
    if ratios is not None:
        attempt("mag", "diffusers MagCache", "calibrated on these weights, threshold 0.06, max skip 3",
                lambda m, s: H.apply_mag_cache(m, H.MagCacheConfig(num_inference_steps=steps, mag_ratios=ratios)))
    attempt("faster", "diffusers FasterCache", "spatial attention skip 2 (guidance part off: see notes)",
            lambda m, s: H.apply_faster_cache(m, H.FasterCacheConfig(
                spatial_attention_block_skip_range=2, current_timestep_callback=s.current_timestep,
                attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
                spatial_attention_block_identifiers=(BLOCK + "attn1",))))
    attempt("sea", "diffusers SeaCache", "defaults", lambda m, s: H.apply_sea_cache(m, H.SeaCacheConfig()))
    return entries, skipped


FBC_INDICATOR: list[float] = []  # FirstBlockCache's decision value (relative change of the first block's residual)


def watch_first_block_cache() -> None:
    """Record the value FirstBlockCache compares with its threshold, every step it decides."""
    from diffusers.hooks import first_block_cache as fbc

    decide = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        prev = self.state_manager.get_state().head_block_residual
        if prev is not None:
            FBC_INDICATOR.append(float(((residual - prev).abs().mean() / prev.abs().mean()).item()))
        return decide(self, residual)

    fbc.FBCHeadBlockHook._should_compute_remaining_blocks = spy


def calibrate_magcache(folder: Path, args, skipped: dict) -> list[float] | None:
    """MagCache needs per-checkpoint magnitude ratios: one calibration run on these weights."""
    from diffusers import hooks as H

    model = load_diffusers(folder)
    try:
        H.apply_mag_cache(model, H.MagCacheConfig(num_inference_steps=args.steps, calibrate=True))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            DiffusersSampler(model, args)(args.steps)
        text = out.getvalue()
        ratios = ast.literal_eval(text[text.rindex("["): text.rindex("]") + 1])
        if len(ratios) != args.steps:
            raise ValueError(f"expected {args.steps} calibration ratios, got {len(ratios)}")
        return [float(r) for r in ratios]
    except Exception as e:
        skipped["diffusers MagCache"] = f"calibration failed: {type(e).__name__}: {e}".splitlines()[0][:240]
        return None


# ------------------------------------------------------------------------------------------
# ours


@contextlib.contextmanager
def diffusers_taylorseer_steps(before: int = 2):
    """Plan our runs on the full steps of diffusers' TaylorSeer (``s < before`` or ``(s - before - 1) % N == 0``)
    instead of ours (``s < W`` or ``(s - W + 1) % N == 0``): the same work, to compare like with like."""
    from clusca_trt import schedule

    original = schedule.step_kind

    def kind(step, interval, warmup, clusters=1):
        if step < before or (step - before - 1) % interval == 0:
            return schedule.StepKind.FULL
        return schedule.StepKind.PARTIAL if clusters > 0 else schedule.StepKind.FORECAST

    schedule.step_kind = kind
    try:
        yield
    finally:
        schedule.step_kind = original


# the update rules compared (``--updates``): name -> (label, generate keywords)
UPDATE_VARIANTS = {
    "paper": ("paper", dict(update="paper", pair=False)),
    "residual": ("residual", dict(update="residual", correction=1.0, pair=False)),
    "step": ("step", dict(update="step", correction=1.0, pair=False)),
    "paper-paired": ("paper, paired", dict(update="paper", pair=True)),
    "step-paired": ("step, paired", dict(update="step", correction=1.0, pair=True)),
    "step-paired-half": ("step, paired, correction 0.5", dict(update="step", correction=0.5, pair=True)),
}


def ours(folder: Path, engines: Path, args) -> list[Entry]:
    loaded = load_model("dit", checkpoint=folder)
    options = BuildOptions(batch=1, clusters=args.clusters, order=2)
    manifest = build_engines(loaded, options, engines).manifest
    ref = Pipeline.from_adapter(loaded.adapter, manifest.spec)
    eng = Pipeline.load(manifest.directory, verify=False)
    common = dict(seed=args.seed, sampler="ddim", cfg_scale=args.cfg_scale)
    cl = dict(interval=args.interval, propagation=args.gamma)

    def run(pipe, method, like_diffusers=False, **kw):
        def sample(steps):
            with diffusers_taylorseer_steps() if like_diffusers else contextlib.nullcontext():
                return pipe.generate([args.label], method=method, steps=steps, **common, **kw).latents

        return sample

    K, n = args.clusters, args.interval
    variants = [
        Entry(f"ours_clusca_{name}", f"ours: engines, ClusCa, update {label}", "ours-engines",
              f"N={n}, K={K}, O=2, gamma={args.gamma}, {label}", run(eng, "clusca", **cl, **rule))
        for name, (label, rule) in UPDATE_VARIANTS.items() if name in args.updates
    ]
    base = [
        Entry("ours_torch_clusca", "ours: PyTorch reference ClusCa", "ours-torch", f"N={n}, K={K}, O=2, gamma={args.gamma}",
              run(ref, "clusca", **cl)),
        Entry("ours_full", "ours: engines, full", "ours-engines", "ONNX Runtime, every step full", run(eng, "full")),
        Entry("ours_clusca", "ours: engines, ClusCa (the family's default update rule)", "ours-engines",
              f"N={n}, K={K}, O=2, gamma={args.gamma}", run(eng, "clusca", **cl)),
        Entry("ours_taylorseer", "ours: engines, TaylorSeer", "ours-engines", f"N={n}, O=2", run(eng, "taylorseer", interval=n)),
        Entry("ours_fora", "ours: engines, FORA", "ours-engines", f"N={n}", run(eng, "fora", interval=n)),
        Entry("ours_clusca_dsteps", "ours: engines, ClusCa on diffusers TaylorSeer's full steps", "ours-engines",
              f"N={n}, K={K}, O=2, gamma={args.gamma}; full at 0, 1, 3, 8, ...", run(eng, "clusca", True, **cl)),
        Entry("ours_taylorseer_dsteps", "ours: engines, TaylorSeer on diffusers TaylorSeer's full steps", "ours-engines",
              f"N={n}, O=2; full at 0, 1, 3, 8, ...", run(eng, "taylorseer", True, interval=n)),
    ]
    return base[:3] + variants + base[3:]  # the rules right after the default ClusCa row


# ------------------------------------------------------------------------------------------
# ours, through the diffusers pipeline (clusca_trt.enable), beside diffusers' TaylorSeer in the same pipeline


@contextlib.contextmanager
def pipeline_noise(seed: int):
    """DiTPipeline's initial noise as every other row draws it (sample key (seed, j)), not its generator's."""
    import diffusers.pipelines.dit.pipeline_dit as pd

    original = pd.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        noise = dit_runtime.initial_noise(dit_runtime.sample_keys(seed, shape[0]), tuple(shape[1:]))
        return torch.from_numpy(noise).to(device=device, dtype=dtype)

    pd.randn_tensor = draw
    try:
        yield
    finally:
        pd.randn_tensor = original


class PipelineSampler:
    """A diffusers ``DiTPipeline`` over the same weights: diffusers' DDIM set up as DiT samples, the same
    noise and guidance as every row; the final latent caught where the pipeline hands it to its (tiny)
    VAE. ``before``: called before each pipeline call (a hook's reset); ``context``: around it."""

    def __init__(self, folder: Path, args, before=None, context=contextlib.nullcontext):
        self.pipe = dit_pipeline(load_diffusers(folder))
        self.args, self.before, self.context = args, before, context

    def __call__(self, steps: int) -> np.ndarray:
        pipe, caught = self.pipe, []
        decode = pipe.vae.decode

        def catch(z, *a, **kw):
            caught.append(z * pipe.vae.config.scaling_factor)
            return decode(z, *a, **kw)

        pipe.vae.decode = catch
        try:
            if self.before:
                self.before()
            with pipeline_noise(self.args.seed), self.context():
                pipe(class_labels=[self.args.label], guidance_scale=self.args.cfg_scale, num_inference_steps=steps,
                     output_type="pt")
        finally:
            del pipe.vae.decode
        return caught[-1].float().numpy()


def ours_through_pipeline(folder: Path, args) -> list[Entry]:
    """(f) our ClusCa inside a diffusers ``DiTPipeline`` (``clusca_trt.enable``: our PyTorch step modules
    over the pipeline's transformer), and (b) diffusers' TaylorSeer hook in the same pipeline: the
    issue-22 target compares the two (the pipeline's own scheduler loop, guidance and VAE hand-off)."""
    import clusca_trt
    from diffusers import hooks as H
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    n, K = args.interval, args.clusters
    ours = PipelineSampler(folder, args)
    clusca_trt.enable(ours.pipe, interval=n, clusters=K, order=2, propagation=args.gamma)
    like = PipelineSampler(folder, args, context=diffusers_taylorseer_steps)  # the hook's full steps: equal PSNR
    clusca_trt.enable(like.pipe, interval=n, clusters=K, order=2, propagation=args.gamma)

    theirs = PipelineSampler(folder, args)
    model = theirs.pipe.transformer
    H.apply_taylorseer_cache(model, H.TaylorSeerCacheConfig(
        cache_interval=n, disable_cache_before_step=2, max_order=2, taylor_factors_dtype=torch.float32,
        cache_identifiers=[BLOCK + "attn1", BLOCK + "ff"]))

    def reset():  # DiTTransformer2DModel is no CacheMixin: the context a FLUX pipeline would set, set here
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        _set_cache_context(model, CacheContext("cond"))

    theirs.before = reset
    return [
        Entry("ours_pipeline_clusca", "ours, through the diffusers pipeline", "ours-torch",
              f"DiTPipeline + clusca_trt.enable: N={n}, K={K}, O=2, gamma={args.gamma}; our step modules", ours),
        Entry("ours_pipeline_clusca_dsteps", "ours, through the diffusers pipeline, on diffusers TaylorSeer's full steps",
              "ours-torch", "as above; full at 0, 1, 3, 8, ...", like),
        Entry("ts_pipeline", "diffusers TaylorSeer, through the DiTPipeline", "diffusers",
              f"attn1 + ff cached, interval {n}, O=2, warm-up 2, fp32; DiTPipeline", theirs),
    ]


# ------------------------------------------------------------------------------------------
# peers a user of this CPU would pick: diffusers in bf16, cache-dit


class _Autocast(torch.nn.Module):
    """A diffusers model called under ``torch.autocast`` on the CPU in bf16 (its output back in fp32)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, hidden_states, timestep=None, class_labels=None):
        from types import SimpleNamespace

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(hidden_states, timestep=timestep, class_labels=class_labels).sample
        return SimpleNamespace(sample=out.float())


def our_full_steps(args) -> list[int]:
    """The full steps of our ClusCa schedule with the engines' defaults (W=2): what cache-dit's mask row computes."""
    from clusca_trt.config import ClusCaConfig
    from clusca_trt.schedule import StepKind, plan

    config = ClusCaConfig(interval=args.interval, clusters=args.clusters, order=2, warmup=2)
    return [s for s, p in enumerate(plan(args.steps, config, 2)) if p.kind is StepKind.FULL]


def cache_peers(folder: Path, args) -> tuple[list[Entry], dict[str, str]]:
    """diffusers eager in bf16 (CPU autocast) and cache-dit's DBCache + TaylorSeer calibrator on the
    same ``DiTTransformer2DModel`` (cache-dit supports it: its DiT block adapter). cache-dit rows:
    F1B0 (the first block always computed) with the TaylorSeer calibrator (order 2) at each of
    ``--cache-dit-thresholds``, and one whose computed steps are ours (a steps mask equal to our
    ClusCa schedule's full steps: like with like). Each run starts a fresh cache context."""
    entries = [Entry("eager_bf16", "diffusers eager, bf16 (CPU autocast)", "diffusers", "torch.autocast('cpu', bf16)",
                     DiffusersSampler(_Autocast(load_diffusers(folder)), args))]
    skipped: dict[str, str] = {}
    import os

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is imported: its INFO is per call
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except ImportError as e:
        skipped["cache-dit"] = f"not installed: {e}"
        return entries, skipped
    steps = args.steps
    full = our_full_steps(args)
    variants = [(f"cachedit{t}", f"cache-dit DBCache + TaylorSeer, threshold {t}",
                 f"F1B0, residual threshold {t}, TaylorSeer O=2, warm-up 2",
                 dict(residual_diff_threshold=t)) for t in args.cache_dit_thresholds]
    variants.append(("cachedit_mask", "cache-dit DBCache + TaylorSeer, our full steps",
                     f"F1B0, steps mask = our ClusCa full steps ({len(full)} of {steps}), TaylorSeer O=2",
                     dict(steps_computation_mask=[int(s in full) for s in range(steps)],
                          steps_computation_policy="static")))
    for key, label, settings, extra in variants:
        model = load_diffusers(folder)
        config = dict(dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, enable_separate_cfg=False,
                           num_inference_steps=steps, residual_diff_threshold=0.08), **extra)

        def refresh(model=model, config=config):
            cache_dit.refresh_context(model, cache_config=DBCacheConfig(**config))

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cache_dit.enable_cache(model, cache_config=DBCacheConfig(**config),
                                       calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=2))
            sampler = DiffusersSampler(model, args, on_reset=refresh)
            sampler(min(3, steps))  # does it run at all?
        except Exception as e:  # an API that moved: report why
            skipped[label] = f"{type(e).__name__}: {e}".splitlines()[0][:240]
            log.warning("%s does not run: %s", label, skipped[label])
            continue
        entries.append(Entry(key, label, "diffusers", settings, sampler))
    return entries, skipped


def openvino_rows(engines: Path, args) -> list[Entry]:
    """Our engines (the same build as ``ours``) on OpenVINO: full compute and ClusCa, in bf16 where
    the CPU has bf16 units, else fp32 (the backend's default)."""
    pipe = Pipeline.load(engines, backend="openvino", verify=False)
    precision = pipe.engine.precision
    common = dict(seed=args.seed, sampler="ddim", cfg_scale=args.cfg_scale)
    n, k = args.interval, args.clusters

    def run(method, like_diffusers=False, **kw):
        def sample(steps):
            with diffusers_taylorseer_steps() if like_diffusers else contextlib.nullcontext():
                return pipe.generate([args.label], method=method, steps=steps, **common, **kw).latents

        return sample

    cl = dict(interval=n, propagation=args.gamma)
    return [
        Entry("ov_full", f"ours: engines on OpenVINO {precision}, full", "ours-engines", "every step full",
              run("full")),
        Entry("ov_clusca", f"ours: engines on OpenVINO {precision}, ClusCa", "ours-engines",
              f"N={n}, K={k}, O=2, gamma={args.gamma}", run("clusca", **cl)),
        Entry("ov_clusca_dsteps", f"ours: engines on OpenVINO {precision}, ClusCa on diffusers TaylorSeer's full steps",
              "ours-engines", f"N={n}, K={k}, O=2, gamma={args.gamma}; full at 0, 1, 3, 8, ...",
              run("clusca", True, **cl)),
    ]


def cpu_targets(by: dict) -> dict:
    """The issue-21 ratios from the rows measured: OpenVINO full vs ONNX Runtime full and vs eager
    bf16; OpenVINO ClusCa vs ONNX Runtime ClusCa and vs OpenVINO full; and our fastest ClusCa vs the
    fastest diffusers / cache-dit row of equal or better PSNR."""
    t = {}
    sec = {k: r["seconds"] for k, r in by.items()}
    if "ov_full" in sec:
        t["openvino_full_vs_onnxruntime_full"] = sec["ours_full"] / sec["ov_full"]
        if "eager_bf16" in sec:
            t["openvino_full_vs_eager_bf16"] = sec["eager_bf16"] / sec["ov_full"]
    if "ov_clusca" in sec:
        t["openvino_clusca_vs_onnxruntime_clusca"] = sec["ours_clusca"] / sec["ov_clusca"]
        t["openvino_clusca_vs_openvino_full"] = sec["ov_full"] / sec["ov_clusca"]
    ours = [by[k] for k in ("ours_clusca", "ours_clusca_dsteps", "ov_clusca", "ov_clusca_dsteps") if k in by]
    peers = [r for r in by.values() if r["group"] == "diffusers"]
    best = []
    for o in ours:
        equal = [r for r in peers if r["psnr"] >= o["psnr"]]
        if equal:
            f = min(equal, key=lambda r: r["seconds"])
            best.append({"ours": o["label"], "ours_psnr": o["psnr"], "peer": f["label"], "peer_psnr": f["psnr"],
                         "ratio": f["seconds"] / o["seconds"]})
    if best:
        t["clusca_vs_fastest_peer_of_equal_or_better_psnr"] = max(best, key=lambda b: b["ratio"])
    return t


# ------------------------------------------------------------------------------------------
# run, measure, report


def errors(latent: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(np.linalg.norm(latent - ref) / np.linalg.norm(ref)), latent_psnr(latent, ref)


def measure(entries: list[Entry], args) -> None:
    for e in entries:  # warm-up
        log.info("warm-up: %s", e.label)
        e.sample(min(args.steps, 8))
    for r in range(args.repeats):
        order = entries[r % len(entries):] + entries[: r % len(entries)]
        for e in order:
            t0 = time.perf_counter()
            latent = e.sample(args.steps)
            e.seconds.append(time.perf_counter() - t0)
            if e.latent is None:
                e.latent = latent
            log.info("round %d/%d: %-40s %8.2f s", r + 1, args.repeats, e.label, e.seconds[-1])


def summarize(entries: list[Entry], skipped: dict, args) -> dict:
    ref = next(e for e in entries if e.key == "eager")
    t_ref = statistics.median(ref.seconds)
    rows = []
    for e in entries:
        rel, psnr = errors(e.latent, ref.latent)
        t = statistics.median(e.seconds)
        rows.append({"key": e.key, "label": e.label, "group": e.group, "settings": e.settings, "seconds": t,
                     "runs": e.seconds, "speedup": t_ref / t, "rel_error": rel, "psnr": psnr})
    by = {r["key"]: r for r in rows}
    targets = {}
    if "ours_full" in by:
        targets["full_engines_vs_eager"] = by["ours_full"]["speedup"]
    if "ours_clusca" in by:
        ours_psnr = by["ours_clusca"]["psnr"]
        peers = [r for r in rows if r["group"] == "diffusers" and r["psnr"] >= ours_psnr]
        if peers:
            fastest = min(peers, key=lambda r: r["seconds"])
            targets["clusca_vs_fastest_hook_of_equal_or_better_psnr"] = {
                "hook": fastest["label"], "ratio": fastest["seconds"] / by["ours_clusca"]["seconds"]}
        else:
            targets["clusca_vs_fastest_hook_of_equal_or_better_psnr"] = {"hook": None, "ratio": None}
        faster = [r for r in rows if r["group"] == "diffusers"]
        if faster:
            f = min(faster, key=lambda r: r["seconds"])
            targets["clusca_vs_fastest_hook_any_psnr"] = {"hook": f["label"], "ratio": f["seconds"] / by["ours_clusca"]["seconds"],
                                                          "hook_psnr": f["psnr"], "ours_psnr": ours_psnr}
    lat = {e.key: e.latent for e in entries}
    if "ts" in by and "ours_clusca_dsteps" in by:
        targets["same_full_steps_as_diffusers_taylorseer"] = {
            "clusca_vs_hook": by["ts"]["seconds"] / by["ours_clusca_dsteps"]["seconds"],
            "clusca_psnr": by["ours_clusca_dsteps"]["psnr"], "hook_psnr": by["ts"]["psnr"],
            "taylorseer_vs_hook": by["ts"]["seconds"] / by["ours_taylorseer_dsteps"]["seconds"],
            "taylorseer_rel_diff_to_hook": float(np.linalg.norm(lat["ours_taylorseer_dsteps"] - lat["ts"])
                                                 / np.linalg.norm(lat["ts"])),
        }
    targets.update(cpu_targets(by))
    never = [e.label for e in entries if e.group == "diffusers" and np.array_equal(e.latent, lat["eager"])]
    return {
        "never_skipped": never,
        "fbc_indicator": {"median": statistics.median(FBC_INDICATOR), "min": min(FBC_INDICATOR),
                          "thresholds": args.fbc_thresholds} if FBC_INDICATOR else None,
        "command": " ".join(["python"] + sys.argv),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
        "cache_dit_version": _version("cache-dit"),
        "versions": library_versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "not_applicable": skipped,
        "targets": targets,
    }


def markdown(s: dict) -> str:
    a = s["settings"]
    lines = [
        "# Peers side by side (DiT, same weights, same noise, same DDIM sampler)",
        "",
        f"`{s['command']}` on {s['device']}, {s['created']}; torch {s['versions'].get('torch')} "
        f"({s['torch_threads']} threads), onnxruntime {s['versions'].get('onnxruntime-gpu') or s['versions'].get('onnxruntime')} (CPU), "
        f"diffusers {s['versions'].get('diffusers')}, openvino {s['versions'].get('openvino')}, "
        f"cache-dit {s.get('cache_dit_version')}.",
        "",
        f"Model: DiT {a['size']} size, random weights (seed {a['seed']}), {SIZE_TOKENS[a['size']]} tokens, one sample with "
        f"classifier-free guidance (batch 2), {a['steps']} DDIM steps, cfg {a['cfg_scale']}. Wall time: median of "
        f"{a['repeats']} interleaved rounds after a warm-up. Errors: final latent vs (a); PSNR with the reference's "
        f"value range as peak.",
        "",
        "| | method | settings | wall s | speed-up vs (a) | rel. error | PSNR dB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    tag = {"reference": "(a)", "diffusers": "(b)", "ours-torch": "(c)", "ours-engines": "(d/e)"}
    for r in s["rows"]:
        psnr = "exact" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        lines.append(f"| {tag[r['group']]} | {r['label']} | {r['settings']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['rel_error']:.2e} | {psnr} |")
    if s["not_applicable"]:
        lines += ["", "Hooks of diffusers that do not apply to `DiTTransformer2DModel` here:", ""]
        lines += [f"- {k}: {v}" for k, v in s["not_applicable"].items()]
    if s.get("never_skipped"):
        lines += ["", "Ran but never skipped a computation here (their result equals (a) bit for bit): "
                  + ", ".join(s["never_skipped"]) + ". With random weights the features change a lot from step to step"
                  + (f" (FirstBlockCache's indicator, the relative change of the first block's residual: median "
                     f"{s['fbc_indicator']['median']:.2f}, min {s['fbc_indicator']['min']:.2f}, against thresholds "
                     f"{s['fbc_indicator']['thresholds']})" if s.get("fbc_indicator") else "")
                  + "; a trained DiT changes far less."]
    t = s["targets"]
    m = t.get("same_full_steps_as_diffusers_taylorseer")
    if m:
        lines += ["", f"Like with like: run on the full steps of diffusers' TaylorSeer (0, 1, 3, 8, ..., 48), our "
                  f"TaylorSeer equals diffusers' to {m['taylorseer_rel_diff_to_hook']:.1e} (relative) and is "
                  f"{m['taylorseer_vs_hook']:.2f}x faster; our ClusCa there reaches {m['clusca_psnr']:.1f} dB "
                  f"(diffusers TaylorSeer {m['hook_psnr']:.1f} dB) and is {m['clusca_vs_hook']:.2f}x faster. "
                  f"The PSNR gap between the default rows comes from which steps are full (ours by the ClusCa "
                  f"reference schedule: 0, 1, 6, 11, ..., 46), not from the methods."]
    lines += ["", "Targets:", ""]
    if "full_engines_vs_eager" in t:
        lines.append(f"- our full engines vs eager PyTorch (same weights, per step): {t['full_engines_vs_eager']:.2f}x (target >= 1.5x on every CPU kind)")
    c = t.get("clusca_vs_fastest_hook_of_equal_or_better_psnr")
    if c:
        lines.append("- our ClusCa vs the fastest diffusers hook of equal or better PSNR: "
                     + (f"{c['ratio']:.2f}x faster than {c['hook']} (target >= 1.5x)" if c["hook"] else
                        "no diffusers hook reaches our PSNR"))
    for key, what, goal in (("openvino_full_vs_onnxruntime_full", "OpenVINO full vs ONNX Runtime full", ">= 1.5x "
                             "(AVX512-BF16), >= 4x (AMX); no slower without bf16 units"),
                            ("openvino_full_vs_eager_bf16", "OpenVINO full vs diffusers eager bf16", ">= 1.5x"),
                            ("openvino_clusca_vs_onnxruntime_clusca", "OpenVINO ClusCa vs ONNX Runtime ClusCa", ">= 3x"),
                            ("openvino_clusca_vs_openvino_full", "OpenVINO ClusCa vs OpenVINO full", ">= 2.5x")):
        if key in t:
            lines.append(f"- {what}: {t[key]:.2f}x (target {goal})")
    b = t.get("clusca_vs_fastest_peer_of_equal_or_better_psnr")
    if b:
        lines.append(f"- our fastest ClusCa ({b['ours']}, {b['ours_psnr']:.1f} dB) vs the fastest diffusers / cache-dit "
                     f"row of equal or better PSNR ({b['peer']}, {b['peer_psnr']:.1f} dB): {b['ratio']:.2f}x "
                     f"(target >= 1.5x)")
    c = t.get("clusca_vs_fastest_hook_any_psnr")
    if c:
        lines.append(f"- our ClusCa vs the fastest diffusers hook at any PSNR ({c['hook']}, {c['hook_psnr']:.1f} dB vs our "
                     f"{c['ours_psnr']:.1f} dB): {c['ratio']:.2f}x")
    return "\n".join(lines) + "\n"


SIZE_TOKENS = {"b2": 256, "tiny": 64}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["rows"]
    colors = {"reference": "#555555", "diffusers": "#e08a2c", "ours-torch": "#6a9bd1", "ours-engines": "#1f4e9c"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2))
    ax1.barh([r["label"] for r in rows], [r["seconds"] for r in rows], color=[colors[r["group"]] for r in rows])
    ax1.invert_yaxis()
    ax1.set_xlabel("wall time per sampling run, s (median)")
    for i, r in enumerate(rows):
        ax1.text(r["seconds"], i, f" {r['speedup']:.2f}x", va="center", fontsize=8)
    for r in rows:
        psnr = min(r["psnr"], 120.0)
        ax2.scatter(r["speedup"], psnr, color=colors[r["group"]], s=40)
        if psnr < 120.0:
            label = r["label"].replace("diffusers ", "").replace("ours: ", "").replace(" TaylorSeer's full steps", "")
            ax2.annotate(label, (r["speedup"], psnr), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax2.annotate("(a), ours full and hooks that never skipped: exact or > 120 dB", (0.9, 118), fontsize=7)
    ax2.set_xlabel("speed-up vs diffusers eager")
    ax2.set_ylabel("PSNR of the final latent vs eager, dB (capped at 120)")
    ax2.grid(alpha=0.3)
    a = s["settings"]
    fig.suptitle(f"DiT {a['size']} (random weights), {a['steps']} DDIM steps, CFG batch 2, N={a['interval']}, "
                 f"K={a['clusters']}; {s['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="b2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--interval", "-N", type=int, default=5)
    p.add_argument("--clusters", "-K", type=int, default=16)
    p.add_argument("--gamma", type=float, default=0.005)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--label", type=int, default=207)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fbc-thresholds", type=float, nargs="*", default=[0.05, 0.2])
    p.add_argument("--updates", nargs="*", choices=sorted(UPDATE_VARIANTS), default=list(UPDATE_VARIANTS),
                   help="ClusCa update rules to run beside the default one (each an engines row)")
    p.add_argument("--cache-dit-thresholds", type=float, nargs="*", default=[0.08, 0.8],
                   help="cache-dit DBCache residual-diff thresholds (random weights change a lot per step)")
    p.add_argument("--no-openvino", action="store_true", help="leave out our engines on OpenVINO")
    p.add_argument("--no-cache-peers", action="store_true", help="leave out eager bf16 and cache-dit")
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "peers", help="model folder and engines (reused)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="peers: %(message)s", stream=sys.stderr)
    for noisy in ("clusca_trt", "onnx_ir", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    folder = args.work / f"dit-{args.size}-diffusers"
    watch_first_block_cache()
    make_diffusers_dit(folder, args.size, args.seed)
    eager = Entry("eager", "diffusers eager (no cache)", "reference", "DiTTransformer2DModel, PyTorch",
                  DiffusersSampler(load_diffusers(folder), args))
    hooks, skipped = diffusers_hooks(folder, args)
    if not args.no_cache_peers:
        more, why = cache_peers(folder, args)
        hooks += more
        skipped.update(why)
    engines = args.work / f"engines-{args.size}-k{args.clusters}"
    entries = [eager, *hooks, *ours(folder, engines, args)]
    entries += ours_through_pipeline(folder, args)
    if not args.no_openvino:
        entries += openvino_rows(engines, args)
    measure(entries, args)
    summary = summarize(entries, skipped, args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "peers" if args.size == "b2" else f"peers-{args.size}"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(markdown(summary))
    plot(summary, args.out / f"{stem}.png")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
