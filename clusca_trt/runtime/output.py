"""Writing generation results: ``.npz`` (latents, labels, images) or a ``.png`` grid."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[n, H, W, C] in [0, 1] -> one uint8 grid [rows*H, cols*W, C]."""
    n, h, w, c = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def write_png(images: np.ndarray, path: Path, columns: int | None = None) -> None:
    from PIL import Image

    grid = image_grid(images, columns)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    _atomic(Path(path), lambda tmp: Image.fromarray(grid[..., 0] if mode == "L" else grid, mode).save(tmp, format="PNG"))


def write_result(result, path: Path) -> None:
    path = Path(path)
    if path.suffix == ".npz":
        arrays = {"latents": result.latents, "labels": result.labels}
        if result.images is not None:
            arrays["images"] = result.images

        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        _atomic(path, save)
    elif path.suffix == ".png":
        if result.images is None:
            raise InputError(
                "expected a model with a decoder (VAE or pixel space) for .png output, got latents only; use .npz"
            )
        write_png(result.images, path)
    else:
        raise InputError(f"expected an output file ending in .npz or .png, got {path.name}")
