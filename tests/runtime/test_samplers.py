import numpy as np
import pytest

from clusca_trt.errors import ConfigError
from clusca_trt.runtime.samplers import GaussianDiffusion, space_timesteps


def test_ddim_respacing_is_dits():
    assert space_timesteps(1000, 50, ddim=True) == list(range(0, 1000, 20))
    assert space_timesteps(1000, 25, ddim=True) == list(range(0, 1000, 40))


def test_even_respacing_is_dits():
    steps = space_timesteps(1000, 250, ddim=False)
    assert len(set(steps)) == 250 and steps[0] == 0 and steps[-1] == 999


def test_respaced_process_keeps_alphas_cumprod():
    d = GaussianDiffusion(50, "ddim")
    base = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(d.acp, base[d.timestep_map], rtol=1e-12)


def test_ddim_recovers_x0_from_exact_eps():
    d = GaussianDiffusion(10, "ddim")
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 2, 3, 3))
    eps = rng.standard_normal(x0.shape)
    i = 9
    xt = np.sqrt(d.acp[i]) * x0 + np.sqrt(1 - d.acp[i]) * eps
    x_prev = d.step(xt.astype(np.float32), eps.astype(np.float32), i, None)
    want = np.sqrt(d.acp_prev[i]) * x0 + np.sqrt(1 - d.acp_prev[i]) * eps
    np.testing.assert_allclose(x_prev, want, atol=1e-4)


def test_bad_sampler_settings():
    with pytest.raises(ConfigError, match="sampler must be one of ddim, ddpm, got 'euler'"):
        GaussianDiffusion(10, "euler")
    with pytest.raises(ConfigError, match="steps must be in 1..1000, got 0"):
        GaussianDiffusion(0)
