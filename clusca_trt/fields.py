"""What a family's sampling takes, and the check of every value before any work: one schema that
``Pipeline.generate``, the CLI's options and the server's request fields all read.

    Field(name, kind, help, default=..., low=..., high=..., choices=..., cli=(...), http=True)

Kinds: ``int``, ``number`` (finite), ``choice``, ``labels`` (a list of class labels), ``prompts``
(a string or a non-empty list of strings), ``array`` (a finite numeric array), ``keys`` (per-sample
``(seed, index)`` pairs), ``path``, ``callable``. ``Field.check(value, sampling)`` returns the value
as the runtime takes it or raises an ``InputError``/``ConfigError`` whose one line says what was
expected and what was got. Pure: numpy and the standard library.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import numpy as np

from .config import MAX_SEED, is_int
from .errors import ConfigError, InputError

MAX_STEPS = 10_000  # sampling steps a schedule may have (``schedule.plan`` checks it again)
MAX_SAMPLES = 100_000  # samples one call may ask for (labels, prompts, keys): far above any engine batch
MAX_INDEX = MAX_SAMPLES - 1  # a sample's index within its seed (its noise is row ``index`` of the seed's draws)
KINDS = ("int", "number", "choice", "labels", "prompts", "array", "keys", "path", "callable")


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, low: int, high: int, error=ConfigError) -> int:
    """``value`` as an int in ``low..high``, or an error naming ``name`` and the range."""
    if not is_int(value) or not low <= int(value) <= high:
        raise error(f"{name} must be an integer in {low}..{high}, got {_show(value)}")
    return int(value)


def check_finite(name: str, value, error=InputError, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float (not a bool, not a string), in ``[low, high]`` where given."""
    if not is_real(value) or not math.isfinite(float(value)):
        raise error(f"{name} must be a finite number, got {_show(value)}")
    v = float(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise error(f"{name} must be a finite number in [{low}, {high}], got {_show(value)}")
    return v


def check_labels(labels, num_classes: int) -> list[int]:
    """A non-empty list (or 1-D array) of integer class labels in ``0..num_classes-1``. A string,
    a float (1.7 is not truncated to 1) or a bool is refused, not converted."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, np.ndarray)):
        raise InputError(f"expected class labels as a list of integers, got {type(labels).__name__} {_show(labels)}")
    if isinstance(labels, np.ndarray) and labels.ndim != 1:
        raise InputError(f"expected class labels as a 1-D list of integers, got an array of shape {list(labels.shape)}")
    values = list(labels)
    if not values:
        raise InputError("expected at least one class label, got none")
    if len(values) > MAX_SAMPLES:
        raise InputError(f"expected at most {MAX_SAMPLES} class labels, got {len(values)}")
    bad = [v.item() if isinstance(v, np.generic) else v for v in values if not is_int(v)]
    if bad:
        raise InputError(f"expected integer class labels, got {_show(bad[0])} ({type(bad[0]).__name__})")
    out = [int(v) for v in values]
    wrong = [v for v in out if not 0 <= v < num_classes]
    if wrong:
        raise InputError(f"class labels must be in 0..{num_classes - 1}, got {wrong[0]}")
    return out


def check_prompts(prompt) -> list[str]:
    """A prompt string or a non-empty list of them, each encodable as UTF-8 (no lone surrogates)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"expected a prompt string or a non-empty list of them, got {_show(prompt)}")
    if len(prompts) > MAX_SAMPLES:
        raise InputError(f"expected at most {MAX_SAMPLES} prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"prompt {i}: expected text encodable as UTF-8, got a lone surrogate") from None
    return list(prompts)


def check_finite_array(name: str, a):
    """An input array (numpy or torch) with only finite values (NaN or inf would make every output NaN)."""
    if type(a).__module__.split(".")[0] == "torch":
        if a.is_floating_point() and not bool(a.isfinite().all()):
            raise InputError(f"{name}: expected finite values, got NaN or inf")
        return a
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError):
        raise InputError(f"{name}: expected a numeric array, got {type(a).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name}: expected finite values, got NaN or inf")
    return a


def check_keys(keys) -> list[tuple[int, int]]:
    """Per-sample random keys: a list of ``(seed, index)`` pairs of integers, seed in 0..MAX_SEED,
    index in 0..MAX_INDEX (the noise of index i costs i + 1 samples' draws: bounded by the samples)."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
        raise InputError(f"keys: expected a list of (seed, index) pairs, got {type(keys).__name__}")
    if len(keys) > MAX_SAMPLES:
        raise InputError(f"keys: expected at most {MAX_SAMPLES} pairs, got {len(keys)}")
    out = []
    for k in keys:
        if not isinstance(k, (list, tuple)) or len(k) != 2 or not all(is_int(v) for v in k):
            raise InputError(f"keys: expected (seed, index) pairs of integers, got {_show(k)}")
        seed = check_int("keys: seed", k[0], 0, MAX_SEED, InputError)
        out.append((seed, check_int("keys: sample index", k[1], 0, MAX_INDEX, InputError)))
    return out


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Field:
    """One input of a family's sampling.

    name:     the ``Pipeline.generate`` keyword and the POST /generate field.
    kind:     one of ``KINDS``: how a value is checked.
    help:     one line, for the CLI's ``--help`` and the documentation.
    default:  the value when none is given (None: none; ``required`` fields have none).
    low/high: the range of an ``int`` or ``number``; choices: the values of a ``choice``.
    shape:    an ``array``'s shape per sample, by the sampling facts that say it (``("text_length",
              "text_dim")``: [n, text_length, text_dim]).
    cli:      its CLI flags (empty: not a CLI option).
    http:     whether the server takes it in a request body.
    error:    the error a bad value raises: ``InputError`` for what a run is given, ``ConfigError``
              for how it runs (steps, sampler, gamma).
    """

    name: str
    kind: str
    help: str
    default: object = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    shape: tuple[str, ...] = ()
    required: bool = False
    cli: tuple[str, ...] = ()
    http: bool = True
    error: type = InputError

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"field kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def check(self, value, sampling: dict):
        """``value`` checked (and for labels, prompts and keys: as the list the runtime takes)."""
        kind, name = self.kind, self.name
        if kind == "int":
            return check_int(name, value, int(self.low), int(self.high), self.error)
        if kind == "number":
            return check_finite(name, value, self.error, self.low, self.high)
        if kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise self.error(f"{name} must be one of {', '.join(self.choices)}, got {_show(value)}")
            return value
        if kind == "labels":
            return check_labels(value, int(sampling["num_classes"]))
        if kind == "prompts":
            return check_prompts(value)
        if kind == "array":
            return check_finite_array(name, value)  # its shape: the runtime's check (``row_shape``)
        if kind == "keys":
            return check_keys(value)
        if kind == "path":
            if not isinstance(value, (str, os.PathLike)):
                raise InputError(f"{name} must be a folder path, got {type(value).__name__}")
            return value
        if not callable(value):  # callable
            raise InputError(f"{name} must be callable, got {type(value).__name__}")
        return value


def row_shape(field: Field, sampling: dict) -> tuple[int, ...]:
    """An ``array`` field's shape per sample, from a build's sampling facts."""
    return tuple(int(sampling[k]) for k in field.shape)


# the fields every family takes
SEED = Field("seed", "int", "Seed of the initial noise and of ClusCa's random choices.", default=0, low=0,
             high=MAX_SEED, cli=("--seed",))
STEPS = Field("steps", "int", "Sampling steps.", low=1, high=MAX_STEPS, cli=("--steps", "-S"), error=ConfigError)
KEYS = Field("keys", "keys", "One (seed, index) per sample instead of (seed, 0), (seed, 1), ...", http=False)
PROGRESS = Field("progress", "callable", "Called with each step's index as it finishes.", http=False)
COMMON = (SEED, STEPS, KEYS, PROGRESS)
