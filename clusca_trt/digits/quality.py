"""Sample quality for the built-in digits model: images ``[n, 32, 32, 1]`` in [0, 1] (what
``Pipeline.generate`` returns as ``images``) -> numbers.

    class_accuracy(images, labels)   the shipped digits classifier's accuracy on generated samples
    fid_digits(images)               Frechet distance of the classifier's penultimate features to
                                     the held-out real digits ("reference" split, stats shipped)
    psnr(a, b), ssim(a, b)           per-image fidelity to a reference output (e.g. full compute,
                                     same seed), averaged over images (``runtime.metrics``)

The classifier (``DigitsClassifier``) was trained on the "classifier" split of
``clusca_trt.digits`` (``benchmarks/train_digits.py``); its weights and the reference feature
statistics ship in ``clusca_trt/data/digits-classifier.safetensors``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, InputError, describe, one_line
from ..runtime.metrics import _gaussian_window, psnr, ssim  # noqa: F401  (the one implementation; re-exported)

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CLASSIFIER_FILE = DATA_DIR / "digits-classifier.safetensors"
FEATURES = 64  # penultimate width: the space FID-digits is measured in


class DigitsClassifier(nn.Module):
    """A small CNN on ``[n, 1, 32, 32]`` in [-1, 1]: three conv/pool stages, a 64-wide
    penultimate layer (``features``), 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class Evaluator:
    """The classifier plus the reference statistics (mean, covariance of its features on the
    held-out real digits)."""

    classifier: DigitsClassifier
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    ref_count: int

    def logits_and_features(self, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        x = to_model_input(images)
        logits, feats = [], []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                f = self.classifier.features(x[i : i + batch])
                feats.append(f.numpy().astype(np.float64))
                logits.append(self.classifier.head(f).numpy())
        return np.concatenate(logits), np.concatenate(feats)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """[n, 32, 32, 1] in [0, 1] -> [n, 1, 32, 32] in [-1, 1]."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 1):
        raise InputError(f"expected images of shape [n, 32, 32, 1] in [0, 1], got {list(images.shape)}")
    return torch.from_numpy(images.transpose(0, 3, 1, 2) * 2.0 - 1.0).contiguous()


def save_evaluator(model: DigitsClassifier, reference_images: np.ndarray, path: Path) -> Evaluator:
    """Write the classifier and the feature statistics of ``reference_images`` ([n, 32, 32, 1])."""
    from safetensors.torch import save_file

    model = model.eval()
    ev = Evaluator(model, np.zeros(FEATURES), np.eye(FEATURES), 0)
    _, feats = ev.logits_and_features(reference_images)
    mu, sigma = feature_stats(feats)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors["reference.mu"] = torch.from_numpy(mu)
    tensors["reference.sigma"] = torch.from_numpy(sigma)
    tensors["reference.count"] = torch.tensor([len(feats)], dtype=torch.int64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"what": "clusca-trt digits classifier + FID-digits reference"})
    return Evaluator(model, mu, sigma, len(feats))


@functools.lru_cache(maxsize=4)
def load_evaluator(path: str | Path = CLASSIFIER_FILE) -> Evaluator:
    """The shipped classifier and reference statistics (or another file written by ``save_evaluator``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"digits classifier not found: expected a file at {path}")
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read digits classifier {path}: {describe(e)}") from e
    try:
        mu = sd.pop("reference.mu").numpy()
        sigma = sd.pop("reference.sigma").numpy()
        count = int(sd.pop("reference.count")[0])
    except KeyError as e:
        raise CheckpointError(f"digits classifier {path} lacks tensor {e.args[0]}") from e
    model = DigitsClassifier()
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"digits classifier {path} does not match DigitsClassifier: {one_line(e)}") from e
    return Evaluator(model.eval(), mu, sigma, count)


# ------------------------------------------------------------------------------------------
# metrics


def predict(images: np.ndarray, evaluator: Evaluator | None = None) -> np.ndarray:
    """The classifier's predicted class per image."""
    logits, _ = (evaluator or load_evaluator()).logits_and_features(images)
    return logits.argmax(axis=1)


def class_accuracy(images: np.ndarray, labels, evaluator: Evaluator | None = None) -> float:
    """Fraction of ``images`` the classifier assigns to their ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise InputError(f"expected one label per image ({len(images)}), got {len(labels)}")
    return float(np.mean(predict(images, evaluator) == labels))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` [n, d], float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"expected features of shape [n >= 2, d], got {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``: the Frechet distance of two
    Gaussians. Eigen-based (both covariances are symmetric PSD), so it is real and stable."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise InputError(f"expected matching [d] means and [d, d] covariances, got {mu1.shape}, {s1.shape}, "
                         f"{mu2.shape}, {s2.shape}")
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0.0, None)).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * cross)
    return max(d, 0.0)


def fid_digits(images: np.ndarray, evaluator: Evaluator | None = None) -> float:
    """FID-digits of ``images`` against the held-out real digits."""
    ev = evaluator or load_evaluator()
    _, feats = ev.logits_and_features(images)
    mu, sigma = feature_stats(feats)
    return frechet_distance(mu, sigma, ev.ref_mu, ev.ref_sigma)


@dataclass(frozen=True)
class Quality:
    """One method's scores (``psnr``/``ssim``: against a reference output; None without one)."""

    samples: int
    accuracy: float
    fid: float
    psnr: float | None = None
    ssim: float | None = None


def evaluate(images: np.ndarray, labels, reference: np.ndarray | None = None,
             evaluator: Evaluator | None = None) -> Quality:
    """Accuracy and FID-digits of ``images``; PSNR/SSIM against ``reference`` where given."""
    ev = evaluator or load_evaluator()
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise InputError(f"expected one label per image ({len(images)}), got {len(labels)}")
    logits, feats = ev.logits_and_features(images)
    mu, sigma = feature_stats(feats)
    acc = float(np.mean(logits.argmax(axis=1) == labels))
    fid = frechet_distance(mu, sigma, ev.ref_mu, ev.ref_sigma)
    p = s = None
    if reference is not None:
        p, s = psnr(images, reference), ssim(images, reference)
    return Quality(len(images), acc, fid, p, s)

