"""DiT's Gaussian diffusion samplers (as in the DiT / guided-diffusion code): a linear beta
schedule over 1000 steps, respaced to the sampling steps, DDIM (eta = 0) and DDPM with the
learned-range variance. Host-side numpy; the coefficients are float64 as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

TRAIN_STEPS = 1000
SAMPLERS = ("ddim", "ddpm")


def linear_betas(steps: int = TRAIN_STEPS) -> np.ndarray:
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, sampling_steps: int, ddim: bool) -> list[int]:
    """The kept training timesteps, as DiT's ``space_timesteps`` picks them ("ddimN" or "N")."""
    if not 1 <= sampling_steps <= num_timesteps:
        raise ConfigError(f"steps must be in 1..{num_timesteps}, got {sampling_steps}")
    if ddim:
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == sampling_steps:
                return list(range(0, num_timesteps, stride))
        # no exact stride: fall back to even spacing (as "N" does)
    if sampling_steps == 1:
        return [0]
    frac = (num_timesteps - 1) / (sampling_steps - 1)
    cur, taken = 0.0, []
    for _ in range(sampling_steps):
        taken.append(round(cur))
        cur += frac
    return taken


@dataclass
class GaussianDiffusion:
    """The respaced process. Index ``i`` runs from ``steps - 1`` down to 0; the model sees
    ``timestep_map[i]`` (a training timestep)."""

    steps: int
    sampler: str = "ddim"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        base = np.cumprod(1.0 - linear_betas())
        use = space_timesteps(TRAIN_STEPS, self.steps, ddim=self.sampler == "ddim")
        last, betas = 1.0, []
        for i in use:
            betas.append(1 - base[i] / last)
            last = base[i]
        self.timestep_map = np.array(use, dtype=np.int64)
        self.betas = np.array(betas, dtype=np.float64)
        acp = np.cumprod(1.0 - self.betas)
        self.acp = acp
        self.acp_prev = np.append(1.0, acp[:-1])
        self.sqrt_recip_acp = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_acp = np.sqrt(1.0 / acp - 1)
        post_var = self.betas * (1.0 - self.acp_prev) / (1.0 - acp)
        self.post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(
            np.maximum(post_var, 1e-20)
        )
        self.post_coef1 = self.betas * np.sqrt(self.acp_prev) / (1.0 - acp)
        self.post_coef2 = (1.0 - self.acp_prev) * np.sqrt(1.0 - self.betas) / (1.0 - acp)

    def model_timestep(self, i: int) -> float:
        return float(self.timestep_map[i])

    def _xstart(self, x: np.ndarray, eps: np.ndarray, i: int) -> np.ndarray:
        return self.sqrt_recip_acp[i] * x - self.sqrt_recipm1_acp[i] * eps

    def step(self, x: np.ndarray, model_out: np.ndarray, i: int, noise: np.ndarray | None) -> np.ndarray:
        """One reverse step at index ``i``. ``model_out`` [n, C or 2C, H, W] (eps, then the
        learned variance values if present); ``noise`` is needed by DDPM only."""
        c = x.shape[1]
        eps = model_out[:, :c].astype(np.float64)
        x64 = x.astype(np.float64)
        x0 = self._xstart(x64, eps, i)
        if self.sampler == "ddim":
            eps = (self.sqrt_recip_acp[i] * x64 - x0) / self.sqrt_recipm1_acp[i]
            out = x0 * np.sqrt(self.acp_prev[i]) + np.sqrt(1.0 - self.acp_prev[i]) * eps
            return out.astype(np.float32)
        mean = self.post_coef1[i] * x0 + self.post_coef2[i] * x64
        if model_out.shape[1] == 2 * c:
            frac = (model_out[:, c:].astype(np.float64) + 1) / 2
            log_var = frac * np.log(self.betas[i]) + (1 - frac) * self.post_log_var_clipped[i]
        else:  # fixed small variance
            log_var = np.full_like(mean, self.post_log_var_clipped[i])
        if i == 0:
            return mean.astype(np.float32)
        return (mean + np.exp(0.5 * log_var) * noise).astype(np.float32)
