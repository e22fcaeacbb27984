"""Class-conditional DiT sampling with classifier-free guidance, over any denoiser: the
ClusCa engines (``ScheduledDenoiser``) or a plain model call (the test oracle).

Batch layout as in DiT: the graph batch is ``[cond (B) | uncond (B)]`` with the null class
``num_classes``; guidance mixes the eps channels, the learned variance comes from the cond half.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from .driver import step_rng
from .inputs import check_labels  # strict: a list of ints, no str / float / bool
from .samplers import GaussianDiffusion

log = logging.getLogger(__name__)

Denoise = Callable[[int, dict], np.ndarray]


def initial_noise(seed: int, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


def apply_cfg(out: np.ndarray, batch: int, channels: int, scale: float) -> np.ndarray:
    cond, uncond = out[:batch], out[batch:]
    eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return np.concatenate([eps, cond[:, channels:]], axis=1)


def sample_chunk(
    denoise: Denoise,
    diffusion: GaussianDiffusion,
    x: np.ndarray,
    labels: list[int],
    num_classes: int,
    cfg_scale: float,
    rng: np.random.Generator,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise one chunk ``x`` [B, C, H, W] (B = the engine batch) through all steps."""
    B, C = x.shape[0], x.shape[1]
    y = np.array(list(labels) + [num_classes] * B, dtype=np.int64)
    for s in range(diffusion.steps):
        i = diffusion.steps - 1 - s
        feeds = {
            "x": np.concatenate([x, x], axis=0),
            "t": np.full((2 * B,), diffusion.model_timestep(i), dtype=np.float32),
            "y": y,
        }
        out = denoise(s, feeds)
        model_out = apply_cfg(out, B, C, cfg_scale)
        noise = rng.standard_normal(x.shape, dtype=np.float32) if diffusion.sampler == "ddpm" else None
        x = diffusion.step(x, model_out, i, noise)
        if progress:
            progress(s)
    return x


def sample(
    make_denoiser: Callable[[np.random.Generator], Denoise],
    batch: int,
    latent_shape: tuple[int, int, int],
    labels: list[int],
    seed: int,
    steps: int,
    sampler: str,
    cfg_scale: float,
    num_classes: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """All ``labels`` in chunks of the engine batch (the last chunk padded). The initial noise
    of every sample comes from ``seed`` first; each chunk then draws its per-step randomness
    (fresh-token keys, k-means starts, DDPM noise) from its own generator."""
    labels = check_labels(labels, num_classes)
    diffusion = GaussianDiffusion(steps, sampler)
    x_all = initial_noise(seed, len(labels), latent_shape)
    out = []
    for j, start in enumerate(range(0, len(labels), batch)):
        chunk = labels[start : start + batch]
        pad = batch - len(chunk)
        x = x_all[start : start + batch]
        if pad:
            x = np.concatenate([x, np.zeros((pad, *latent_shape), np.float32)])
        rng = step_rng(seed, j)
        denoise = make_denoiser(rng)
        result = sample_chunk(denoise, diffusion, x, chunk + [0] * pad, num_classes, cfg_scale, rng, progress)
        out.append(result[: len(chunk)])
    return np.concatenate(out, axis=0)


def generate(
    pipe,
    config,
    class_labels,
    seed: int = 0,
    steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float = 1.5,
    progress: Callable[[int], None] | None = None,
):
    """``Pipeline.generate`` for DiT: class-conditional sampling with guidance."""
    planned = pipe.plan(steps, config)
    info = pipe.model["sampling"]
    factory = pipe.denoisers(planned, config)
    labels = check_labels(class_labels, info["num_classes"])
    t0 = time.perf_counter()
    latents = sample(
        factory,
        pipe.spec.options.batch,
        tuple(info["latent_shape"]),
        labels,
        seed,
        steps,
        sampler,
        cfg_scale,
        info["num_classes"],
        progress,
    )
    return pipe.result(factory, latents, labels, time.perf_counter() - t0)
