"""ClusCa run-time configuration: which method, how often a full step runs, how caches are updated.

Config is data, validated once: every field is checked in ``__post_init__`` and the objects
are frozen, so a config that exists is a valid one.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .errors import ConfigError


MAX_SEED = 2**63 - 1  # seeds of runs and of random weights


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool: JSON, option and argument values."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class Method(str, Enum):
    """The caching methods one set of engines can run (see the spec, "special cases")."""

    CLUSCA = "clusca"  # K > 0: one fresh token per cluster, propagation
    TAYLORSEER = "taylorseer"  # K = 0, O >= 1: pure Taylor forecast
    FORA = "fora"  # K = 0, O = 0: reuse of the cached branch outputs
    FULL = "full"  # interval 1: the original model

    @classmethod
    def parse(cls, value: "str | Method") -> "Method":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"method must be one of {', '.join(m.value for m in cls)}, got {value!r}"
            ) from None


class FreshPolicy(str, Enum):
    """How the one fresh token per cluster is chosen in a partial step."""

    RANDOM = "random"  # uniform over the cluster's members, anew per block and step, seeded
    NEAREST = "nearest"  # the member nearest to the centroid (fixed for the cycle)

    @classmethod
    def parse(cls, value: "str | FreshPolicy") -> "FreshPolicy":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"fresh-token policy must be one of {', '.join(p.value for p in cls)}, got {value!r}"
            ) from None


class UpdateRule(str, Enum):
    """How a partial step's fresh tokens update the MLP cache (``ops.partial_update``).

    With ``w`` = 1 for a fresh token j and gamma for the other members of its cluster:

    * paper:    the reference: ``F_0[n] <- w f_j + (1 - w) F_0[n]``, kept for later steps, so a fresh
                token's output is ``f_j`` plus the Taylor trend and the next full step's derivatives
                see the written values;
    * residual: correct by the forecast's error, ``F_0[n] <- F_0[n] + w (f_j - forecast_j)``, kept;
    * step:     the same correction for this step's output only: F_0 stays the model's output at the
                last full step (nothing leaks into later steps or the next derivatives).

    ``ClusCaConfig.correction`` scales the correction of the residual rules.
    """

    PAPER = "paper"
    RESIDUAL = "residual"
    STEP = "step"

    @classmethod
    def parse(cls, value: "str | UpdateRule") -> "UpdateRule":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"update rule must be one of {', '.join(u.value for u in cls)}, got {value!r}"
            ) from None

    def fields(self, correction: float = 1.0) -> tuple[float, float, float]:
        """The partial graph's ``update`` input (``ops.UPDATE_FIELDS``): (residual, keep, correction)."""
        return {
            UpdateRule.PAPER: (0.0, 1.0, 1.0),
            UpdateRule.RESIDUAL: (1.0, 1.0, float(correction)),
            UpdateRule.STEP: (1.0, 0.0, float(correction)),
        }[self]


@dataclass(frozen=True)
class ClusCaConfig:
    """Cluster-driven caching. More clusters: higher fidelity, less speed-up.

    interval:    N, cycle length (a full step every N steps after the warm-up); 1 = no caching.
    clusters:    K, clusters per token group; 0 = no fresh tokens (TaylorSeer / FORA).
    propagation: gamma in [0, 1], weight of the cluster's fresh value for the other members.
    order:       O, Taylor order of the forecast (0 = plain reuse).
    warmup:      W, leading steps that are always full.
    fresh:       fresh-token policy.
    update:      how the fresh tokens update the MLP cache (``UpdateRule``).
    correction:  in [0, 1], the share of the fresh tokens' correction applied (residual rules;
                 1 with the paper's rule, whose update is not a correction); one number for every
                 block, or one per block (a tuple as long as the model has blocks with fresh rows).
    pair:        the rows of one sample (classifier-free guidance: its cond and uncond rows) share
                 one clustering and the same fresh tokens; off, each row clusters and draws alone
                 (the reference). No effect where a sample has one row.
    """

    interval: int = 5
    clusters: int = 16
    propagation: float = 0.005
    order: int = 2
    warmup: int = 2
    fresh: FreshPolicy = FreshPolicy.RANDOM
    update: UpdateRule = UpdateRule.PAPER
    correction: float | tuple[float, ...] = 1.0
    pair: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.interval) or self.interval < 1:
            raise ConfigError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not is_int(self.clusters) or self.clusters < 0:
            raise ConfigError(f"clusters must be an integer >= 0, got {self.clusters!r}")
        if not _is_real(self.propagation) or not 0.0 <= float(self.propagation) <= 1.0:  # NaN fails too
            raise ConfigError(f"propagation (gamma) must be in [0, 1] (a number), got {self.propagation!r}")
        if not is_int(self.order) or self.order < 0:
            raise ConfigError(f"order must be an integer >= 0, got {self.order!r}")
        if not is_int(self.warmup) or self.warmup < 1:
            raise ConfigError(f"warmup must be an integer >= 1, got {self.warmup!r}")
        object.__setattr__(self, "fresh", FreshPolicy.parse(self.fresh))
        object.__setattr__(self, "propagation", float(self.propagation))
        object.__setattr__(self, "update", UpdateRule.parse(self.update))
        object.__setattr__(self, "correction", _parse_correction(self.correction))
        if not isinstance(self.pair, bool):
            raise ConfigError(f"pair must be true or false, got {self.pair!r}")
        if self.update is UpdateRule.PAPER and self.correction not in (1.0, (1.0,) * _len(self.correction)):
            raise ConfigError(f"correction applies to the residual update rules: expected 1 with update paper, "
                              f"got {self.correction}")
        for name in ("interval", "clusters", "order", "warmup"):  # numpy integers as plain ints (JSON)
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def method(self) -> Method:
        if self.interval == 1:
            return Method.FULL
        if self.clusters > 0:
            return Method.CLUSCA
        return Method.TAYLORSEER if self.order > 0 else Method.FORA

    def replace(self, **changes) -> "ClusCaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_method(
        cls,
        method: "str | Method",
        *,
        built_clusters: int,
        built_order: int,
        defaults: "ClusCaConfig | None" = None,
        interval: int | None = None,
        propagation: float | None = None,
        order: int | None = None,
        warmup: int | None = None,
        fresh: "str | FreshPolicy | None" = None,
        update: "str | UpdateRule | None" = None,
        correction: float | None = None,
        pair: bool | None = None,
    ) -> "ClusCaConfig":
        """The config that runs ``method`` on engines built with ``built_clusters``/``built_order``.

        Unset options take the family's ``defaults``. FORA forces order 0, TaylorSeer and
        FORA force K = 0, full forces interval 1.
        """
        method = Method.parse(method)
        base = defaults or cls()
        if order is None:
            order = min(base.order, built_order)
            if method is Method.TAYLORSEER and order < 1:  # defaults of FORA (O = 0, e.g. chosen by tune)
                order = built_order
        if not is_int(order) or order < 0:  # before comparing: a string would not compare
            raise ConfigError(f"order must be an integer >= 0, got {order!r}")
        if order > built_order:
            raise ConfigError(
                f"order must be <= the built Taylor order {built_order}, got {order}; "
                f"rebuild with --order {order}"
            )
        if method is Method.TAYLORSEER and order < 1:
            raise ConfigError(f"taylorseer needs order >= 1, got {order}")
        clusters = {
            Method.CLUSCA: built_clusters,
            Method.TAYLORSEER: 0,
            Method.FORA: 0,
            Method.FULL: 0,
        }[method]
        if method is Method.CLUSCA and built_clusters == 0:
            raise ConfigError("clusca needs engines built with --clusters >= 1, got engines with K = 0")
        if method is Method.FORA:
            order = 0
        chosen_interval = base.interval if interval is None else interval
        if method is Method.FULL:
            if interval not in (None, 1):
                raise ConfigError(f"method full runs every step, so interval must be 1, got {interval}")
            chosen_interval = 1
        return cls(
            interval=chosen_interval,
            clusters=clusters,
            propagation=base.propagation if propagation is None else propagation,
            order=order,
            warmup=base.warmup if warmup is None else warmup,
            fresh=base.fresh if fresh is None else fresh,
            update=base.update if update is None else update,
            correction=_correction(base, update, correction),
            pair=base.pair if pair is None else pair,
        )

    def corrections(self, blocks: int) -> tuple[float, ...]:
        """The correction of each of ``blocks`` blocks (one number: the same for all)."""
        if isinstance(self.correction, float):
            return (self.correction,) * blocks
        if len(self.correction) != blocks:
            raise ConfigError(f"expected one correction per block with fresh rows ({blocks}), "
                              f"got {len(self.correction)}")
        return self.correction

    def update_fields(self, blocks: int) -> tuple[tuple[float, float, float], ...]:
        """The partial graph's ``update`` input for engines with ``blocks`` blocks of fresh rows."""
        return tuple(self.update.fields(c) for c in self.corrections(blocks))


def _len(value) -> int:
    return len(value) if isinstance(value, tuple) else 1


def _parse_correction(value) -> float | tuple[float, ...]:
    """A correction in [0, 1], or a non-empty list of them (one per block) -> float or tuple."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(_is_real(v) and 0.0 <= float(v) <= 1.0 for v in values):
        raise ConfigError(f"correction must be a number in [0, 1] or a list of them (one per block), got {value!r}")
    return tuple(float(v) for v in values) if isinstance(value, (list, tuple)) else float(value)


def _correction(base: ClusCaConfig, update, correction):
    """The correction of a config made from ``base``: as given; else the base's, unless the rule
    changes to the paper's (which takes none)."""
    if correction is not None:
        return correction
    if update is not None and UpdateRule.parse(update) is UpdateRule.PAPER:
        return 1.0
    return base.correction
