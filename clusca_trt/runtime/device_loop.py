"""A chunk's whole sampling loop on the engine's device: the torch backend's fast path.

The host loop (``runtime/dit.py``'s ``sample_chunk``, ``diffusers_common.denoise_steps``) brings
``out`` to the host every step, applies guidance and the sampler there, and sends the latents
back: one host synchronisation per step. Where the engine can run a loop itself
(``Denoiser.loop_engine``: an engine whose ``device_loop`` is on, the torch engine on the CPU and on
CUDA) the family runtime hands it the whole chunk instead:

* every step's graphs and host feeds come from the same ``ScheduledDenoiser.calls`` (the run's
  pre-drawn k-means starts and fresh-token keys, the conditioning graph's call) and DDPM's noise
  from the same per-sample streams, so a seed gives the same run on either path; they are
  uploaded once;
* guidance and the sampler step run in torch on the device: DiT's DDIM / DDPM in float64 as
  ``GaussianDiffusion.step`` computes them, the flow-matching Euler step in float32 as diffusers'
  ``FlowMatchEulerDiscreteScheduler.step`` does;
* the latents stay on the device; the final ones come back once (the loop's one host
  synchronisation, counted in ``engine.host_syncs``).

ONNX Runtime and TensorRT keep the host loop. Per-graph timings are not recorded on this path (the
device runs ahead of the host; a step's time is the loop's time over its steps).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .denoiser import SAMPLER, stream
from .samplers import GaussianDiffusion


# --------------------------------------------------------------------------------------------
# DiT: guidance and DDIM / DDPM


class GaussianUpdate:
    """``(s, x, out) -> next x`` on the device: classifier-free guidance over ``out`` [2B, C or 2C, H, W]
    (cond | uncond), then ``GaussianDiffusion.step`` at index ``steps - 1 - s``, the same arithmetic
    in float64; ``noise`` [S, B, C, H, W] (DDPM only) was drawn on the host in the host loop's order."""

    def __init__(self, diffusion: GaussianDiffusion, batch: int, channels: int, cfg_scale: float,
                 noise: torch.Tensor | None):
        self.d, self.B, self.C, self.scale, self.noise = diffusion, batch, channels, cfg_scale, noise

    def __call__(self, s: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d, B, C = self.d, self.B, self.C
        i = d.steps - 1 - s
        c = {k: float(getattr(d, k)[i]) for k in ("sqrt_recip_acp", "sqrt_recipm1_acp", "acp_prev", "post_coef1",
                                                    "post_coef2", "betas", "post_log_var_clipped")}
        cond, uncond = out[:B], out[B:]
        eps32 = uncond[:, :C] + self.scale * (cond[:, :C] - uncond[:, :C])  # float32, as apply_cfg
        eps = eps32.double()
        x64 = x.double()
        x0 = c["sqrt_recip_acp"] * x64 - c["sqrt_recipm1_acp"] * eps
        if d.sampler == "ddim":
            eps = (c["sqrt_recip_acp"] * x64 - x0) / c["sqrt_recipm1_acp"]
            return (x0 * float(np.sqrt(c["acp_prev"])) + float(np.sqrt(1.0 - c["acp_prev"])) * eps).float()
        mean = c["post_coef1"] * x0 + c["post_coef2"] * x64
        if out.shape[1] == 2 * C:
            frac = (cond[:, C:].double() + 1) / 2
            log_var = frac * float(np.log(c["betas"])) + (1 - frac) * c["post_log_var_clipped"]
        else:
            log_var = torch.full_like(mean, c["post_log_var_clipped"])
        if i == 0:
            return mean.float()
        return (mean + torch.exp(0.5 * log_var) * self.noise[s]).float()


def dit_chunk(denoise, diffusion: GaussianDiffusion, x: np.ndarray, labels: list[int], num_classes: int,
              cfg_scale: float, keys: list, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``runtime.dit.sample_chunk`` with the loop on the engine's device (same arguments, same result)."""
    engine = denoise.loop_engine
    B, C = x.shape[0], x.shape[1]
    y = np.array(list(labels) + [num_classes] * B, dtype=np.int64)
    ts = [np.full((2 * B,), diffusion.model_timestep(diffusion.steps - 1 - s), dtype=np.float32)
          for s in range(diffusion.steps)]
    denoise.condition([{"t": t, "y": y} for t in ts])
    streams = [stream(k, SAMPLER) for k in keys] if diffusion.sampler == "ddpm" else None
    steps, noise = [], []
    for s in range(diffusion.steps):
        steps.append(denoise.calls(s, {"t": ts[s], "y": y}))
        if streams:  # each sample's DDPM noise from its own stream, in step order: the host loop's draws
            noise.append(np.stack([g.standard_normal(x.shape[1:], dtype=np.float32) for g in streams]))
    noise_t = engine.to_device(np.stack(noise)) if noise else None  # uploaded once, like every other feed
    update = GaussianUpdate(diffusion, B, C, cfg_scale, noise_t)
    return engine.run_loop(x, steps, lambda xt: {"x": torch.cat([xt, xt], dim=0)}, update, progress)


# --------------------------------------------------------------------------------------------
# flow matching: the Euler step of diffusers' FlowMatchEulerDiscreteScheduler


def flow_chunk(denoise, scheduler, latents: np.ndarray, feeds: Callable[[torch.Tensor, torch.Tensor], dict],
               progress: Callable[[int], None] | None = None) -> np.ndarray | None:
    """``diffusers_common.denoise_steps`` with the loop on the engine's device; None where it cannot
    be (a stochastic scheduler, or latents that are not a model input as they are): run the host loop."""
    engine = denoise.loop_engine
    if getattr(scheduler.config, "stochastic_sampling", False):
        return None
    timesteps = list(scheduler.timesteps)
    probe = torch.from_numpy(np.asarray(latents, np.float32))
    first, second = feeds(probe, timesteps[0]), feeds(probe + 1.0, timesteps[0])
    moving = [n for n in first if not np.array_equal(first[n], second[n])]
    if len(moving) != 1 or not np.array_equal(first[moving[0]], probe.numpy()):
        return None  # the latents reach the model some other way than as one input, unchanged
    name = moving[0]
    sigmas = scheduler.sigmas  # float32; step s moves from sigmas[s] to sigmas[s + 1]
    begin = scheduler.begin_index or 0
    dts = [float(sigmas[begin + s + 1] - sigmas[begin + s]) for s in range(len(timesteps))]
    steps = []
    for s, t in enumerate(timesteps):
        f = feeds(probe, t)
        f.pop(name)
        steps.append(denoise.calls(s, f))

    def update(s: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return (x.float() + dts[s] * out).to(out.dtype)

    return engine.run_loop(latents, steps, lambda xt: {name: xt}, update, progress)
