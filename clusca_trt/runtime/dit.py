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

from ..errors import InputError
from . import device_loop
from .denoiser import PAD_KEY, SAMPLER, Denoiser, SampleKey, as_denoiser, initial_noise, sample_keys, stream
from ..fields import check_labels  # strict: a list of ints, no str / float / bool
from .samplers import GaussianDiffusion

log = logging.getLogger(__name__)

Denoise = Callable[[int, dict], np.ndarray]  # a Denoiser, or a plain model call (the test oracle)




def apply_cfg(out: np.ndarray, batch: int, channels: int, scale: float) -> np.ndarray:
    cond, uncond = out[:batch], out[batch:]
    eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return np.concatenate([eps, cond[:, channels:]], axis=1)


def sample_chunk(
    denoise: Denoiser,
    diffusion: GaussianDiffusion,
    x: np.ndarray,
    labels: list[int],
    num_classes: int,
    cfg_scale: float,
    keys: list[SampleKey],
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Denoise one chunk ``x`` [B, C, H, W] (B = the engine batch; ``keys``: one per sample) through
    all steps."""
    B, C = x.shape[0], x.shape[1]
    y = np.array(list(labels) + [num_classes] * B, dtype=np.int64)
    ts = [np.full((2 * B,), diffusion.model_timestep(diffusion.steps - 1 - s), dtype=np.float32)
          for s in range(diffusion.steps)]
    denoise.condition([{"t": t, "y": y} for t in ts])  # the engines take every step's conditioning ahead
    noise = [stream(k, SAMPLER) for k in keys] if diffusion.sampler == "ddpm" else None
    for s in range(diffusion.steps):
        i = diffusion.steps - 1 - s
        out = denoise(s, {"x": np.concatenate([x, x], axis=0), "t": ts[s], "y": y})
        model_out = apply_cfg(out, B, C, cfg_scale)
        z = np.stack([g.standard_normal(x.shape[1:], dtype=np.float32) for g in noise]) if noise else None
        x = diffusion.step(x, model_out, i, z)
        if progress:
            progress(s)
    return x


def sample(
    make_denoiser: Callable[[list[SampleKey]], Denoise],
    batch: int,
    latent_shape: tuple[int, int, int],
    labels: list[int],
    seed: int,
    steps: int,
    sampler: str,
    cfg_scale: float,
    num_classes: int,
    progress: Callable[[int], None] | None = None,
    keys: list[SampleKey] | None = None,
) -> np.ndarray:
    """All ``labels`` in chunks of the engine batch (the last chunk padded). Sample ``j`` has the
    key ``keys[j]`` (default ``(seed, j)``): its initial noise, its ClusCa draws and its DDPM noise
    come from that key alone, whatever shares its chunk."""
    labels = check_labels(labels, num_classes)
    keys = sample_keys(seed, len(labels)) if keys is None else list(keys)
    if len(keys) != len(labels):
        raise InputError(f"expected one sample key per label ({len(labels)}), got {len(keys)}")
    diffusion = GaussianDiffusion(steps, sampler)
    x_all = initial_noise(keys, latent_shape)
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        pad = batch - len(chunk)
        chunk_keys = keys[start : start + batch] + [PAD_KEY] * pad
        x = x_all[start : start + batch]
        if pad:
            x = np.concatenate([x, np.zeros((pad, *latent_shape), np.float32)])
        denoise = as_denoiser(make_denoiser(chunk_keys))
        run = device_loop.dit_chunk if denoise.loop_engine is not None else sample_chunk
        result = run(denoise, diffusion, x, chunk + [0] * pad, num_classes, cfg_scale, chunk_keys, progress)
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
    keys: list[SampleKey] | None = None,
):
    """``Pipeline.generate`` for DiT: class-conditional sampling with guidance. ``keys``: one
    ``(seed, index)`` per label, instead of ``(seed, 0), (seed, 1), ...`` (a server batching requests)."""
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
        keys,
    )
    return pipe.result(factory, latents, labels, time.perf_counter() - t0)
