"""Run-time input checks, done before any sampling work: every number in range and finite, every
label an integer, every embedding finite; and the check of what comes out (the final latents and images; a non-finite
model output already stops the run at its step: ``driver.ScheduledDenoiser``).

    check_generate_inputs(family, args, kwargs)   the family's keywords of ``Pipeline.generate``
    check_labels(labels, num_classes)            a list of class labels, strictly
    check_finite_output(name, array)             the final latents / images

Every message is one line: "expected X, got Y".
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..config import MAX_SEED
from ..errors import ConfigError, InputError, NonFiniteOutputError
from ..schedule import MAX_STEPS  # DiT's samplers also stop at their 1000 training steps
EMBEDDINGS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, low: int, high: int, error=ConfigError) -> int:
    """``value`` as an int in ``low..high``, or an error naming ``name`` and the range."""
    if not _is_int(value) or not low <= int(value) <= high:
        raise error(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def check_finite(name: str, value, error=InputError) -> float:
    """``value`` as a finite float (not a bool, not a string)."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise error(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_steps(steps) -> int:
    return check_int("steps", steps, 1, MAX_STEPS)


def check_seed(seed) -> int:
    return check_int("seed", seed, 0, MAX_SEED, InputError)


def check_labels(labels, num_classes: int) -> list[int]:
    """A non-empty list (or 1-D array) of integer class labels in ``0..num_classes-1``. A string,
    a float (1.7 is not truncated to 1) or a bool is refused, not converted."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, np.ndarray)):
        raise InputError(f"expected class labels as a list of integers, got {type(labels).__name__} {labels!r}"[:200])
    if isinstance(labels, np.ndarray) and labels.ndim != 1:
        raise InputError(f"expected class labels as a 1-D list of integers, got an array of shape {list(labels.shape)}")
    values = list(labels)
    if not values:
        raise InputError("expected at least one class label, got none")
    bad = [v.item() if isinstance(v, np.generic) else v for v in values if not _is_int(v)]
    if bad:
        raise InputError(f"expected integer class labels, got {bad[0]!r} ({type(bad[0]).__name__})"[:200])
    out = [int(v) for v in values]
    wrong = [v for v in out if not 0 <= v < num_classes]
    if wrong:
        raise InputError(f"class labels must be in 0..{num_classes - 1}, got {wrong[0]}")
    return out


def check_finite_array(name: str, a) -> None:
    """An input array with only finite values (NaN or inf would make every output NaN)."""
    try:
        import torch

        if isinstance(a, torch.Tensor):
            if a.is_floating_point() and not bool(torch.isfinite(a).all()):
                raise InputError(f"{name}: expected finite values, got NaN or inf")
            return
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name}: expected finite values, got NaN or inf")


def check_keys(keys) -> None:
    """Per-sample random keys: a list of ``(seed, index)`` pairs of integers, seed as ``check_seed``,
    index >= 0."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
        raise InputError(f"keys: expected a list of (seed, index) pairs, got {type(keys).__name__}")
    for k in keys:
        if (not isinstance(k, (list, tuple)) or len(k) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in k)):
            raise InputError(f"keys: expected (seed, index) pairs of integers, got {k!r}"[:200])
        check_seed(k[0])
        if not 0 <= k[1] < 2**31:
            raise InputError(f"keys: expected a sample index in 0..{2**31 - 1}, got {k[1]}")


def check_generate_inputs(family: str, args: tuple, kwargs: dict) -> None:
    """The family keywords of ``Pipeline.generate`` that are numbers or arrays, checked before the
    schedule is planned or anything is sampled (types and the full range of each)."""
    if "steps" in kwargs and kwargs["steps"] is not None:
        check_steps(kwargs["steps"])
    if "seed" in kwargs:
        check_seed(kwargs["seed"])
    if kwargs.get("keys") is not None:
        check_keys(kwargs["keys"])
    for name in ("cfg_scale", "guidance_scale"):
        if kwargs.get(name) is not None:
            check_finite(name, kwargs[name])
    if kwargs.get("text_propagation") is not None:  # its range [0, 1] is the driver's check
        check_finite("text_propagation", kwargs["text_propagation"], ConfigError)
    for name in EMBEDDINGS:
        if kwargs.get(name) is not None:
            check_finite_array(name, kwargs[name])
    if family == "dit":
        labels = kwargs.get("class_labels", args[0] if args else None)
        if labels is None:
            raise InputError("expected class_labels (a list of integers), got none")
        if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, np.ndarray)):
            raise InputError(f"expected class labels as a list of integers, got {type(labels).__name__} {labels!r}"[:200])


def check_finite_output(name: str, a: np.ndarray | None) -> None:
    """The run's result (final latents, decoded images) has only finite values."""
    if a is not None and not np.isfinite(a).all():
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise NonFiniteOutputError(
            f"{name}: expected finite values, got {bad} NaN/inf of {a.size}; nothing was written "
            f"(a NaN/inf weight, input or a too large guidance scale)"
        )
