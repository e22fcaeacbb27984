"""Decoders: model outputs -> images ``[n, H, W, C]`` float32 in [0, 1].

    {"kind": "pixels"}                 a pixel-space model: images = (x + 1) / 2
    {"kind": "vae", "path": FOLDER}    a diffusers AutoencoderKL folder: decode(x / scaling_factor + shift_factor)
    {"kind": "video-vae", "path": FOLDER}  a diffusers AutoencoderKLHunyuanVideo folder: latents [n, C, F, h, w]
                                       -> frames ``[n, frames, H, W, C]``, decode(x / scaling_factor)
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, describe

log = logging.getLogger(__name__)


def to_images(x: np.ndarray) -> np.ndarray:
    """[n, C, H, W] in [-1, 1] -> [n, H, W, C] in [0, 1]."""
    return np.clip((x.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1).copy()


@functools.lru_cache(maxsize=2)
def _vae(path: str):
    from diffusers import AutoencoderKL

    try:
        # small: no accelerate notice; a local folder only, never the network
        return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False, local_files_only=True).eval()
    except Exception as e:
        raise CheckpointError(f"cannot load the VAE at {path}: {describe(e)}") from e


def prepare(decoder: dict | None) -> None:
    """Check and load the decoder before sampling (a missing or broken VAE fails in seconds, not
    after the run). Its folder must be a local folder with ``config.json``: a path that is not one
    never reaches diffusers, which would take it for a Hub repository and go to the network."""
    if not decoder or decoder.get("kind") == "pixels":
        return
    kind, path = decoder.get("kind"), decoder.get("path")
    if kind not in ("vae", "video-vae"):
        raise ConfigError(f"decoder kind must be 'pixels', 'vae' or 'video-vae', got {kind!r}")
    if not isinstance(path, str) or not Path(path).is_absolute() or not (Path(path) / "config.json").is_file():
        raise CheckpointError(
            f"expected the {kind} folder (config.json) the engines were built with at {path}, got none; "
            f"restore it or rebuild the engines"
        )
    (_vae if kind == "vae" else _video_vae)(path)


def decode(decoder: dict | None, latents: np.ndarray) -> np.ndarray | None:
    """Images for ``latents``, or None where the engines have no decoder."""
    if not decoder:
        return None
    if decoder["kind"] == "pixels":
        return to_images(latents)
    if decoder["kind"] == "vae":
        import torch

        vae = _vae(decoder["path"])
        _check_channels(vae, latents, decoder)
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # FLUX's VAE has one; SD's has none
        with torch.no_grad():
            x = vae.decode(torch.from_numpy(latents) / scale + shift).sample.numpy()
        return to_images(x)
    if decoder["kind"] == "video-vae":
        import torch

        vae = _video_vae(decoder["path"])
        _check_channels(vae, latents, decoder)
        with torch.no_grad():
            x = vae.decode(torch.from_numpy(latents) / float(vae.config.scaling_factor)).sample.numpy()
        n, c, f, h, w = x.shape
        return to_images(x.transpose(0, 2, 1, 3, 4).reshape(n * f, c, h, w)).reshape(n, f, h, w, c)
    raise ConfigError(f"decoder kind must be 'pixels', 'vae' or 'video-vae', got {decoder['kind']!r}")


def _check_channels(vae, latents: np.ndarray, decoder: dict) -> None:
    """The VAE decodes latents of its own channel count: anything else is a one-line error, not a
    convolution's traceback part-way through decoding."""
    want = getattr(vae.config, "latent_channels", None)
    if isinstance(want, int) and latents.ndim >= 2 and latents.shape[1] != want:
        raise CheckpointError(f"the {decoder['kind']} at {decoder['path']} decodes {want} latent channels, expected "
                              f"the model's {latents.shape[1]}; rebuild the engines with the model's own VAE")


@functools.lru_cache(maxsize=1)
def _video_vae(path: str):
    from diffusers import AutoencoderKLHunyuanVideo

    try:
        return AutoencoderKLHunyuanVideo.from_pretrained(path, local_files_only=True).eval()
    except Exception as e:
        raise CheckpointError(f"cannot load the video VAE at {path}: {describe(e)}") from e
