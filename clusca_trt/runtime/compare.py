"""Side by side: the same inputs and seed through full compute and each caching method on one
set of engines, in one process -> per-method results, wall-clock speed-ups vs full, and a
PNG grid with one row per method.

    rows = compare_methods(pipe, dict(class_labels=[0, 1, 2], steps=50), methods=("full", "clusca"))
    write_comparison_png(rows, "compare.png")

Every method first runs once untimed on a short schedule (the first call of a graph pays for
ONNX Runtime's lazy initialisation), then once timed; the speed-up is full's sampling time
over the method's, both measured here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..files import write_atomic

log = logging.getLogger(__name__)

COMPARE_METHODS = ("full", "clusca", "fora", "taylorseer")


def available_methods(clustered: bool, order: int, methods=COMPARE_METHODS) -> list[str]:
    """Those of ``methods`` that engines run: clusca needs clustered graphs, taylorseer a Taylor order >= 1."""
    return [m for m in methods if not (m == "clusca" and not clustered) and not (m == "taylorseer" and order < 1)]


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``images`` against ``reference`` (both in [0, 1], one shape):
    10 log10(1 / MSE); inf where they are equal."""
    if images.shape != reference.shape:
        raise InputError(f"expected images of the reference's shape {list(reference.shape)}, got "
                         f"{list(images.shape)}")
    mse = float(np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


@dataclass(frozen=True)
class MethodRun:
    """One method's run: its label (method and settings), result and speed-up vs full."""

    label: str
    result: object  # GenerateResult
    speedup: float


def method_label(config) -> str:
    """The method and its settings in a few words: "clusca N=5 K=16 O=2 g=0.005", "fora N=5", "full"."""
    m = config.method.value
    if m == "full":
        return "full"
    if m == "clusca":
        return f"clusca N={config.interval} K={config.clusters} O={config.order} g={config.propagation:g}"
    if m == "taylorseer":
        return f"taylorseer N={config.interval} O={config.order}"
    return f"fora N={config.interval}"


def compare_methods(pipe, inputs: dict, methods=COMPARE_METHODS, seed: int = 0, warm: bool = True,
                    **settings) -> list[MethodRun]:
    """Run ``methods`` (full first, whether listed or not) on ``inputs`` (the family's
    ``generate`` keywords, e.g. ``class_labels`` and ``steps``) with ``seed``. ``settings``
    (interval, propagation, order, warmup, fresh) apply to every caching method."""
    methods = ["full", *[m for m in methods if m != "full"]]
    if len(set(methods)) != len(methods):
        raise ConfigError(f"expected distinct methods, got {', '.join(methods)}")
    configs = {}
    for m in methods:
        s = {} if m == "full" else dict(settings)
        if m == "fora":
            s.pop("order", None)
        configs[m] = s
    if warm:
        steps = int(inputs.get("steps", 50))
        short = dict(inputs, steps=min(steps, 8))
        for key in ("class_labels", "prompt"):
            if key in short and isinstance(short[key], (list, tuple)):
                short[key] = list(short[key])[:1]
        for m in methods:
            pipe.generate(**short, seed=seed, method=m, **configs[m])
    rows = []
    full_seconds = None
    for m in methods:
        result = pipe.generate(**inputs, seed=seed, method=m, **configs[m])
        if full_seconds is None:
            full_seconds = result.seconds
        speedup = full_seconds / result.seconds if result.seconds > 0 else float("nan")
        rows.append(MethodRun(method_label(result.config), result, speedup))
        log.info("%s: %.3f s, %.2fx vs full", rows[-1].label, result.seconds, speedup)
    return rows


def comparison_grid(rows: list[tuple[str, np.ndarray]], scale: int = 2, label_width: int = 200) -> np.ndarray:
    """One row per ``(label, images [n, H, W, C] in [0, 1])``, images scaled up ``scale`` times
    (nearest), the label written in a left margin: uint8 [rows*H*scale, label_width + n*W*scale, C]."""
    from PIL import Image, ImageDraw

    if not rows:
        raise InputError("expected at least one row of images, got none")
    shape = rows[0][1].shape
    if any(imgs.shape != shape for _, imgs in rows):
        raise InputError(f"expected every row of the same shape {list(shape)}, got "
                         f"{[list(imgs.shape) for _, imgs in rows]}")
    n, h, w, c = shape
    hs, ws = h * scale, w * scale
    grid = np.zeros((len(rows) * hs, label_width + n * ws, c), np.uint8)
    for r, (label, imgs) in enumerate(rows):
        big = np.clip(imgs, 0, 1).repeat(scale, axis=1).repeat(scale, axis=2)
        big = (big * 255).round().astype(np.uint8)
        for i in range(n):
            grid[r * hs : (r + 1) * hs, label_width + i * ws : label_width + (i + 1) * ws] = big[i]
    canvas = Image.fromarray(grid[..., 0] if c == 1 else grid, "L" if c == 1 else "RGB")
    draw = ImageDraw.Draw(canvas)
    for r, (label, _) in enumerate(rows):
        y = r * hs + 2
        for line in label.split("\n"):
            draw.text((4, y), line, fill=255 if c == 1 else (255, 255, 255))
            y += 11
    out = np.asarray(canvas)
    return out[..., None] if c == 1 else out


def write_comparison_png(runs: list[MethodRun], path: Path, scale: int = 2) -> None:
    """The grid of ``compare_methods``'s runs: one row per method, labelled with its speed-up."""
    from PIL import Image

    if any(r.result.images is None for r in runs):
        raise InputError("expected a model with a decoder (VAE or pixel space) for a comparison grid, got latents only")
    rows = [(f"{r.label.replace(' ', chr(10), 1)}\n{r.speedup:.2f}x", r.result.images) for r in runs]
    grid = comparison_grid(rows, scale=scale)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    img = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode)
    write_atomic(Path(path), lambda tmp: img.save(tmp, format="PNG"))
