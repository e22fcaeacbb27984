"""HunyuanVideo text-to-video sampling over any denoiser: the ClusCa engines (``ScheduledDenoiser``)
or a plain model call (the test oracle).

* Sampler: diffusers' ``FlowMatchEulerDiscreteScheduler`` (config from the checkpoint folder,
  recorded at build time: shift 7.0 for the released model) with the HunyuanVideo pipeline's
  sigmas ``linspace(1, 0, steps + 1)[:-1]``; 50 steps by default; embedded guidance 6.0 fed to the
  model as ``guidance * 1000`` (no second pass), the timestep as the scheduler's ``t``.
* Latents: [n, C, latent frames, H/8, W/8] drawn as ``HunyuanVideoPipeline.prepare_latents``
  does, from one ``torch.Generator`` seeded with ``seed``: a seed gives diffusers' initial noise.
* Prompts: Llama (prompt template, cropped) + CLIP in PyTorch through diffusers'
  ``HunyuanVideoPipeline.encode_prompt``, loaded from the checkpoint folder the engines were
  built from (or ``encoders=``). Precomputed ``prompt_embeds`` [n, text_length, Llama dim],
  ``pooled_prompt_embeds`` [n, CLIP dim] and ``prompt_attention_mask`` [n, text_length] skip it.
* Frames: decoded by the pipeline's ``AutoencoderKLHunyuanVideo`` in PyTorch (``runtime.decode``).
* ClusCa: the video tokens propagate with gamma; the text tokens only scatter their fresh rows
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
from ..models.hunyuan_video import HunyuanVideoConfig
from . import diffusers_common
from .diffusers_common import (
    Denoise, check_embeds, check_rows, denoise_steps, padded_chunks, prompt_list, quiet_import, quiet_loading,
    text_pipeline,
)
from .dit import step_rng

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 6.0
DEFAULT_STEPS = 50


def _pipeline_module():
    return quiet_import("diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video")


# --------------------------------------------------------------------------------------------
# latents and schedule


def initial_latents(seed: int, n: int, cfg: HunyuanVideoConfig) -> np.ndarray:
    """Initial noise [n, C, F, H, W], as ``HunyuanVideoPipeline.prepare_latents`` draws it on the CPU."""
    return torch.randn((n, *cfg.latent_shape), generator=torch.Generator().manual_seed(seed)).numpy()


def make_scheduler(cfg: HunyuanVideoConfig, steps: int):
    """A fresh scheduler with the HunyuanVideo pipeline's sigmas (the shift is in its config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg.scheduler)
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
    _pipeline_module().retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas)
    scheduler.set_begin_index(0)
    return scheduler


def sample_chunk(
    denoise: Denoise,
    cfg: HunyuanVideoConfig,
    steps: int,
    latents: np.ndarray,
    prompt_embeds: np.ndarray,
    attention_mask: np.ndarray,
    pooled: np.ndarray,
    guidance_scale: float,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise one chunk of ``latents`` [B, C, F, H, W] (B = the engine batch) through all steps."""
    B = latents.shape[0]
    guidance = (torch.tensor([guidance_scale] * B, dtype=torch.float32) * 1000.0).numpy()

    def feeds(x, t):
        f = {
            "hidden_states": x.numpy(),
            "encoder_hidden_states": prompt_embeds,
            "encoder_attention_mask": attention_mask,
            "pooled_projections": pooled,
            "timestep": t.expand(B).to(torch.float32).numpy(),
        }
        if cfg.guidance_embeds:
            f["guidance"] = guidance
        return f

    return denoise_steps(denoise, make_scheduler(cfg, steps), latents, feeds, progress)


def sample(
    make_denoiser: Callable[[np.random.Generator], Denoise],
    batch: int,
    cfg: HunyuanVideoConfig,
    prompt_embeds: np.ndarray,
    attention_mask: np.ndarray,
    pooled: np.ndarray,
    seed: int,
    steps: int,
    guidance_scale: float = DEFAULT_GUIDANCE,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """All videos in chunks of the engine batch (the last one padded: zero embeddings, a one-token
    mask); returns latents [n, C, F, H, W]. The initial noise of all videos comes from ``seed``
    first; each chunk then draws its fresh-token keys and k-means starts from its own generator."""
    x_all = initial_latents(seed, prompt_embeds.shape[0], cfg)
    out = []
    for j, real, (x, e, p, m) in padded_chunks(batch, x_all, prompt_embeds, pooled, attention_mask):
        m[real:, 0] = 1.0  # a padded row attends to one text token (no empty softmax)
        result = sample_chunk(make_denoiser(step_rng(seed, j)), cfg, steps, x, e, m, p, guidance_scale, progress)
        out.append(result[:real])
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------
# prompts


@functools.lru_cache(maxsize=1)
def _text_pipeline(root: str):
    """diffusers' HunyuanVideoPipeline with the text encoders and tokenizers only (no transformer, no VAE)."""
    return text_pipeline(_pipeline_module().HunyuanVideoPipeline, root, "HunyuanVideo")


def encoder_folder(pipe, encoders: str | Path | None) -> Path:
    """Where the text encoders are: ``encoders``, or the checkpoint folder the engines came from."""
    return diffusers_common.encoder_folder(
        pipe, encoders, "HunyuanVideo", "prompt_embeds, pooled_prompt_embeds and prompt_attention_mask"
    )


def encode_prompts(root: Path, prompts: list[str], text_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Llama token embeddings [n, text_length, D], their mask [n, text_length] and CLIP pooled
    embeddings [n, D_CLIP] of ``prompts``, as the pipeline makes them (template applied, then cropped).

    A prompt longer than the built text length is refused (diffusers would cut it silently)."""
    ph = _pipeline_module()
    pipe = _text_pipeline(str(root))
    template = ph.DEFAULT_PROMPT_TEMPLATE
    for i, p in enumerate(prompts):
        n = len(pipe.tokenizer(template["template"].format(p)).input_ids) - template["crop_start"]
        if n > text_length:
            raise InputError(
                f"prompt {i} is {n} Llama tokens, expected at most the built text length {text_length}; "
                f"shorten it or rebuild with --text-length {n}"
            )
    with torch.no_grad(), quiet_loading():
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=prompts, device=torch.device("cpu"), max_sequence_length=text_length
        )
    return embeds.float().numpy(), mask.float().numpy(), pooled.float().numpy()


def prompt_inputs(pipe, cfg: HunyuanVideoConfig, prompt, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask,
                  encoders):
    """(prompts or None, Llama embeddings, their mask, CLIP pooled embeddings) for a run, validated."""
    prompts = prompt_list(prompt, prompt_embeds, "pooled_prompt_embeds and prompt_attention_mask")
    if prompts is not None:
        embeds, mask, pooled = encode_prompts(encoder_folder(pipe, encoders), prompts, cfg.text_length)
        return prompts, embeds, mask, pooled
    if pooled_prompt_embeds is None or prompt_attention_mask is None:
        missing = "pooled_prompt_embeds" if pooled_prompt_embeds is None else "prompt_attention_mask"
        raise InputError(f"expected {missing} with prompt_embeds, got none")
    embeds = check_embeds("prompt_embeds", prompt_embeds, (cfg.text_length, cfg.text_embed_dim))
    pooled = check_embeds("pooled_prompt_embeds", pooled_prompt_embeds, (cfg.pooled_projection_dim,))
    mask = check_embeds("prompt_attention_mask", prompt_attention_mask, (cfg.text_length,))
    check_rows(embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)
    if not np.isin(mask, (0.0, 1.0)).all() or (mask.sum(axis=1) < 1).any():
        raise InputError("prompt_attention_mask: expected 0/1 values with at least one 1 per row, got others")
    return None, embeds, mask, pooled


# --------------------------------------------------------------------------------------------
# the family entry point


def generate(
    pipe,
    config,
    prompt: str | list[str] | None = None,
    *,
    prompt_embeds=None,
    pooled_prompt_embeds=None,
    prompt_attention_mask=None,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    text_propagation: float = 0.0,
    encoders: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
):
    """``Pipeline.generate`` for HunyuanVideo: text-to-video from prompts or precomputed embeddings.

    ``steps``: default 50. ``guidance_scale``: embedded guidance (6.0). ``text_propagation``: gamma
    of the text tokens (0: scatter only, as the reference). ``encoders``: a HunyuanVideo pipeline
    folder with the text encoders, if the engines' source folder has none. Returns the VAE latents
    [n, C, F, H/8, W/8] (and, with a VAE, the frames [n, frames, H, W, 3] as ``images``)."""
    cfg = HunyuanVideoConfig(**pipe.model["config"])
    steps = DEFAULT_STEPS if steps is None else steps
    planned = pipe.plan(steps, config)
    prompts, embeds, mask, pooled = prompt_inputs(
        pipe, cfg, prompt, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask, encoders
    )
    factory = pipe.denoisers(planned, config, propagation={"txt": text_propagation})
    t0 = time.perf_counter()
    latents = sample(factory, pipe.spec.options.batch, cfg, embeds, mask, pooled, seed, steps, guidance_scale, progress)
    seconds = time.perf_counter() - t0
    return pipe.result(factory, latents, None, seconds, prompts=prompts, steps=steps)
