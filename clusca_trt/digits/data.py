"""The digits data of the built-in model: scikit-learn's bundled ``load_digits`` (1,797 8x8
grey images, values 0..16, 10 classes; the UCI "Optical Recognition of Handwritten Digits"
set) -> ``[n, 1, 32, 32]`` float32 in [-1, 1] (bilinear upscaling by 4), and one fixed,
seeded, per-class split:

    "train"       half of every class: what the built-in DiT (``dit-digits``) was trained on
    "classifier"  a quarter: what the quality classifier was trained on
    "reference"   a quarter: held out from both; classifier accuracy and FID-digits reference

scikit-learn is needed only here (``pip install clusca-trt[bench]``); it is imported lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

SIZE = 32  # the model's pixel grid (8x8 upscaled by 4)
SPLITS = ("train", "classifier", "reference")
SPLIT_SEED = 0
_FRACTIONS = (0.5, 0.25)  # train, classifier; the rest is the reference


@dataclass(frozen=True)
class DigitsSplit:
    """One split: ``images`` [n, 1, 32, 32] float32 in [-1, 1], ``labels`` [n] int64."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def as_unit(self) -> np.ndarray:
        """The images as the pipeline writes them: [n, 32, 32, 1] float32 in [0, 1]."""
        return ((self.images + 1.0) / 2.0).transpose(0, 2, 3, 1).copy()


def upscale(images8: np.ndarray) -> np.ndarray:
    """[n, 8, 8] with values 0..16 -> [n, 1, 32, 32] float32 in [-1, 1] (bilinear, as torch's
    ``interpolate(..., align_corners=False)``)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(images8, np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return (x * 2.0 - 1.0).numpy()


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Per-class seeded split of ``range(len(labels))`` into ``SPLITS`` (sorted indices)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a = int(round(len(idx) * _FRACTIONS[0]))
        b = a + int(round(len(idx) * _FRACTIONS[1]))
        for name, chunk in zip(SPLITS, (idx[:a], idx[a:b], idx[b:])):
            parts[name].append(chunk)
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ConfigError(
            "the digits data needs scikit-learn (pip install 'clusca-trt[bench]'), got no sklearn module"
        ) from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_split(name: str) -> DigitsSplit:
    """The split ``name`` (one of ``SPLITS``) at 32x32 in [-1, 1]."""
    if name not in SPLITS:
        raise ConfigError(f"digits split must be one of {', '.join(SPLITS)}, got {name!r}")
    images, labels = _load_raw()
    idx = split_indices(labels)[name]
    return DigitsSplit(name, upscale(images[idx]), labels[idx])
