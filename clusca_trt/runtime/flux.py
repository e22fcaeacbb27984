"""FLUX text-to-image sampling over any denoiser: the ClusCa engines (``ScheduledDenoiser``) or a
plain model call (the test oracle).

* Sampler: diffusers' ``FlowMatchEulerDiscreteScheduler`` (config from the checkpoint folder,
  recorded at build time) with the FLUX pipeline's sigmas and its resolution-dependent shift
  (``calculate_shift``: mu grows linearly with the image token count); 50 steps (dev) or 4
  (schnell) by default; distilled guidance 3.5 fed to the model (dev only, no second pass).
* Latents: drawn, packed (2 x 2 patches -> tokens) and unpacked as diffusers' ``FluxPipeline``
  does, from one ``torch.Generator`` seeded with ``seed``: a seed gives diffusers' initial noise.
* Prompts: T5 + CLIP in PyTorch through diffusers' ``FluxPipeline.encode_prompt``, loaded from
  the checkpoint folder the engines were built from (or ``encoders=``). Precomputed
  ``prompt_embeds`` [n, text_length, T5 dim] and ``pooled_prompt_embeds`` [n, CLIP dim] skip it.
* ClusCa: the image tokens propagate with gamma; the text tokens only scatter their fresh rows
  (gamma 0, as the reference), unless ``text_propagation`` is set.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..models.flux import FluxConfig
from . import diffusers_common
from .diffusers_common import (
    Denoise, check_embeds, check_rows, denoise_steps, padded_chunks, prompt_list, quiet_import, quiet_loading,
    text_pipeline,
)
from .dit import step_rng

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 3.5


def _flux_pipeline_module():
    return quiet_import("diffusers.pipelines.flux.pipeline_flux")


# --------------------------------------------------------------------------------------------
# latents and schedule


def initial_latents(seed: int, n: int, cfg: FluxConfig) -> np.ndarray:
    """Packed initial noise [n, image tokens, in_channels], as ``FluxPipeline.prepare_latents`` draws it."""
    lh, lw = cfg.latent_size
    noise = torch.randn((n, cfg.latent_channels, lh, lw), generator=torch.Generator().manual_seed(seed))
    return _flux_pipeline_module().FluxPipeline._pack_latents(noise, n, cfg.latent_channels, lh, lw).numpy()


def unpack(latents: np.ndarray, cfg: FluxConfig) -> np.ndarray:
    """[n, tokens, C*4] -> the VAE latent [n, C, H/8, W/8]."""
    fp = _flux_pipeline_module().FluxPipeline
    return fp._unpack_latents(torch.from_numpy(latents), cfg.height, cfg.width, cfg.vae_scale_factor).numpy()


def make_scheduler(cfg: FluxConfig, steps: int):
    """A fresh scheduler with the FLUX pipeline's sigmas and shift for this resolution."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pf = _flux_pipeline_module()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg.scheduler)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    c = scheduler.config
    mu = pf.calculate_shift(
        cfg.image_tokens,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )
    pf.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler


def sample_chunk(
    denoise: Denoise,
    cfg: FluxConfig,
    steps: int,
    latents: np.ndarray,
    prompt_embeds: np.ndarray,
    pooled: np.ndarray,
    guidance_scale: float,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise one chunk of packed ``latents`` [B, tokens, C] (B = the engine batch) through all steps."""
    B = latents.shape[0]
    guidance = np.full((B,), guidance_scale, np.float32) if cfg.guidance_embeds else None

    def feeds(x, t):
        f = {
            "hidden_states": x.numpy(),
            "encoder_hidden_states": prompt_embeds,
            "pooled_projections": pooled,
            "timestep": (t.expand(B).to(torch.float32) / 1000).numpy(),
        }
        if guidance is not None:
            f["guidance"] = guidance
        return f

    return denoise_steps(denoise, make_scheduler(cfg, steps), latents, feeds, progress)


def sample(
    make_denoiser: Callable[[np.random.Generator], Denoise],
    batch: int,
    cfg: FluxConfig,
    prompt_embeds: np.ndarray,
    pooled: np.ndarray,
    seed: int,
    steps: int,
    guidance_scale: float = DEFAULT_GUIDANCE,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """All samples in chunks of the engine batch (the last one padded with zeros); returns packed
    latents [n, tokens, C]. The initial noise of all samples comes from ``seed`` first; each chunk
    then draws its fresh-token keys and k-means starts from its own generator."""
    x_all = initial_latents(seed, prompt_embeds.shape[0], cfg)
    out = []
    for j, real, (x, e, p) in padded_chunks(batch, x_all, prompt_embeds, pooled):
        result = sample_chunk(make_denoiser(step_rng(seed, j)), cfg, steps, x, e, p, guidance_scale, progress)
        out.append(result[:real])
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------
# prompts


@functools.lru_cache(maxsize=1)
def _text_pipeline(root: str):
    """diffusers' FluxPipeline with the text encoders and tokenizers only (no transformer, no VAE)."""
    return text_pipeline(_flux_pipeline_module().FluxPipeline, root, "FLUX")


def encoder_folder(pipe, encoders: str | Path | None) -> Path:
    """Where the text encoders are: ``encoders``, or the checkpoint folder the engines came from."""
    return diffusers_common.encoder_folder(pipe, encoders, "FLUX", "prompt_embeds and pooled_prompt_embeds")


def encode_prompts(root: Path, prompts: list[str], text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """T5 token embeddings [n, text_length, D_T5] and CLIP pooled embeddings [n, D_CLIP] of ``prompts``.

    A prompt longer than the built text length is refused (diffusers would cut it silently)."""
    pipe = _text_pipeline(str(root))
    for i, p in enumerate(prompts):
        n = len(pipe.tokenizer_2(p).input_ids)
        if n > text_length:
            raise InputError(
                f"prompt {i} is {n} T5 tokens, expected at most the built text length {text_length}; "
                f"shorten it or rebuild with --text-length {min(n, 512)}"
            )
    with torch.no_grad(), quiet_loading():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=text_length
        )
    return embeds.float().numpy(), pooled.float().numpy()


def prompt_inputs(pipe, cfg: FluxConfig, prompt, prompt_embeds, pooled_prompt_embeds, encoders):
    """(prompts or None, T5 embeddings, CLIP pooled embeddings) for a run, validated."""
    prompts = prompt_list(prompt, prompt_embeds, "pooled_prompt_embeds")
    if prompts is not None:
        embeds, pooled = encode_prompts(encoder_folder(pipe, encoders), prompts, cfg.text_length)
        return prompts, embeds, pooled
    if pooled_prompt_embeds is None:
        raise InputError("expected pooled_prompt_embeds with prompt_embeds, got none")
    embeds = check_embeds("prompt_embeds", prompt_embeds, (cfg.text_length, cfg.joint_attention_dim))
    pooled = check_embeds("pooled_prompt_embeds", pooled_prompt_embeds, (cfg.pooled_projection_dim,))
    check_rows(embeds, pooled_prompt_embeds=pooled)
    return None, embeds, pooled


# --------------------------------------------------------------------------------------------
# the family entry point


def default_steps(model: dict) -> int:
    return FluxConfig(**model["config"]).default_steps


def generate(
    pipe,
    config,
    prompt: str | list[str] | None = None,
    *,
    prompt_embeds=None,
    pooled_prompt_embeds=None,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    text_propagation: float = 0.0,
    encoders: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
):
    """``Pipeline.generate`` for FLUX: text-to-image from prompts or precomputed embeddings.

    ``steps``: default 50 (dev) or 4 (schnell). ``guidance_scale``: distilled guidance (dev;
    schnell has none). ``text_propagation``: gamma of the text tokens (0: scatter only, as the
    reference). ``encoders``: a FLUX pipeline folder with the text encoders, if the engines'
    source folder has none. Returns the VAE latents [n, C, H/8, W/8] (and images with a VAE)."""
    cfg = FluxConfig(**pipe.model["config"])
    steps = cfg.default_steps if steps is None else steps
    planned = pipe.plan(steps, config)
    prompts, embeds, pooled = prompt_inputs(pipe, cfg, prompt, prompt_embeds, pooled_prompt_embeds, encoders)
    factory = pipe.denoisers(planned, config, propagation={"txt": text_propagation})
    t0 = time.perf_counter()
    packed = sample(factory, pipe.spec.options.batch, cfg, embeds, pooled, seed, steps, guidance_scale, progress)
    seconds = time.perf_counter() - t0
    return pipe.result(factory, unpack(packed, cfg), None, seconds, prompts=prompts, steps=steps)
