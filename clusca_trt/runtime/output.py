"""Writing generation results: ``.npz`` (latents, labels, images), a ``.png`` grid (videos: one row of
frames per video) or ``.mp4`` videos. Files appear whole (one rename) with the user's umask;
``check_output`` vets the location before sampling, so a read-only folder fails in seconds;
``result_bytes`` gives the same ``.npz``/``.png`` bytes in memory (what ``clusca-trt serve`` answers)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import temp_prefix, write_atomic

SUFFIXES = (".npz", ".png", ".mp4")


def _needs_images(suffix: str) -> InputError:
    return InputError(
        f"expected a model with a decoder (VAE or pixel space) for {suffix} output, got latents only; use .npz"
    )


def check_output(path: Path, has_decoder: bool) -> None:
    """Before any sampling: ``path`` ends in .npz/.png/.mp4, image output has a decoder, and its folder
    exists (or can be made) and takes a new file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"expected an output file ending in .npz, .png or .mp4, got {path.name}")
    if path.suffix != ".npz" and not has_decoder:
        raise _needs_images(path.suffix)
    if path.is_dir():
        raise InputError(f"expected an output file at {path}, got a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"expected a writable location for {path}, got {type(e).__name__}: {e.strerror or e}") from None


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


def png_bytes(images: np.ndarray, columns: int | None = None) -> bytes:
    """[n, H, W, C] in [0, 1] -> the PNG of their grid (grey for one channel)."""
    from PIL import Image

    grid = image_grid(images, columns)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, "L" if grid.shape[-1] == 1 else "RGB").save(
        buf, format="PNG")
    return buf.getvalue()


def result_arrays(result) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` result: ``latents``, ``labels`` (class-conditional models; text-to-image
    has prompts instead) and ``images`` where decoded."""
    arrays = {"latents": result.latents}
    if result.labels is not None:
        arrays["labels"] = result.labels
    if result.images is not None:
        arrays["images"] = result.images
    return arrays


def result_bytes(result, fmt: str) -> bytes:
    """The bytes of ``result`` as a ``.npz`` (``fmt="npz"``) or ``.png`` grid (videos: a row of frames each)."""
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, **result_arrays(result))
        return buf.getvalue()
    if fmt != "png":
        raise InputError(f"expected an output format npz or png, got {fmt!r}")
    if result.images is None:
        raise _needs_images(".png")
    images = result.images
    if images.ndim == 5:  # videos: one row of frames per video
        n, f = images.shape[:2]
        return png_bytes(images.reshape(n * f, *images.shape[2:]), columns=f)
    return png_bytes(images)


def write_result(result, path: Path) -> None:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"expected an output file ending in .npz, .png or .mp4, got {path.name}")
    if path.suffix != ".npz" and result.images is None:
        raise _needs_images(path.suffix)
    if path.suffix == ".mp4":
        write_mp4(result.images, path)
        return
    data = result_bytes(result, path.suffix[1:])
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def video_paths(path: Path, count: int) -> list[Path]:
    """``path`` for one video; ``<stem>-0.mp4``, ``<stem>-1.mp4``, ... for several."""
    path = Path(path)
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def write_mp4(videos: np.ndarray, path: Path, fps: int = 24) -> list[Path]:
    """Videos [n, frames, H, W, C] in [0, 1] -> H.264 MP4 files (imageio with its bundled ffmpeg)."""
    if videos.ndim != 5:
        raise InputError(
            f"expected videos [n, frames, H, W, C] for .mp4 output, got images of shape {list(videos.shape)}"
        )
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise InputError("expected imageio and imageio-ffmpeg for .mp4 output (pip install 'clusca-trt[video]'), "
                         "got none; use .png or .npz") from None
    frames = (np.clip(videos, 0, 1) * 255).round().astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    paths = video_paths(path, len(frames))
    for video, p in zip(frames, paths):

        def save(tmp, video=video):
            with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264") as w:
                for frame in video:
                    w.append_data(frame)

        write_atomic(p, save)
    return paths
