"""Fidelity of generated outputs to a reference (e.g. full compute with the same seed): images
``[n, H, W, C]`` in ``[0, data_range]`` -> one number per image, or their mean.

    psnr_each(a, b), ssim_each(a, b)   per image (``[n]`` float64)
    psnr(a, b), ssim(a, b)             the mean over images (``digits.quality`` re-exports these)

Runtime layer, so that both ``analysis`` (``clusca-trt tune``) and ``digits`` (the quality
benchmark) use the one implementation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise InputError(f"expected two image stacks of one shape [n, H, W, C], got {list(a.shape)} and {list(b.shape)}")
    return a, b


def psnr_each(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """``10 log10(data_range^2 / MSE)`` of every image (inf where an image is identical)."""
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean over images of ``10 log10(data_range^2 / MSE)`` (inf where an image is identical)."""
    return float(np.mean(psnr_each(a, b, data_range)))


def latent_psnr(latent: np.ndarray, reference: np.ndarray) -> float:
    """One PSNR over two whole arrays (final latents of any shape), the reference's value range as
    the peak: ``10 log10(range^2 / MSE)``; inf where they are equal (the benchmarks' error column)."""
    mse = float(np.mean((np.asarray(latent, np.float64) - reference) ** 2))
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - (size - 1) / 2.0) ** 2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_each(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, window: int = 11,
              sigma: float = 1.5) -> np.ndarray:
    """SSIM of every image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    valid positions only), averaged over its channels and positions."""
    a, b = _pair(a, b)
    n, h, w, c = a.shape
    if h < window or w < window:
        raise InputError(f"expected images of at least {window}x{window} for SSIM, got {h}x{w}")
    k = torch.from_numpy(_gaussian_window(window, sigma)).view(1, 1, window, window)
    x = torch.from_numpy(a.transpose(0, 3, 1, 2).reshape(n * c, 1, h, w))
    y = torch.from_numpy(b.transpose(0, 3, 1, 2).reshape(n * c, 1, h, w))

    def blur(t):
        return torch.nn.functional.conv2d(t, k)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(dim=1).numpy()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over images (``ssim_each``)."""
    return float(np.mean(ssim_each(a, b, data_range, window, sigma)))
