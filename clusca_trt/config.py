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


@dataclass(frozen=True)
class ClusCaConfig:
    """Cluster-driven caching. More clusters: higher fidelity, less speed-up.

    interval:    N, cycle length (a full step every N steps after the warm-up); 1 = no caching.
    clusters:    K, clusters per token group; 0 = no fresh tokens (TaylorSeer / FORA).
    propagation: gamma in [0, 1], weight of the cluster's fresh value for the other members.
    order:       O, Taylor order of the forecast (0 = plain reuse).
    warmup:      W, leading steps that are always full.
    fresh:       fresh-token policy.
    """

    interval: int = 5
    clusters: int = 16
    propagation: float = 0.005
    order: int = 2
    warmup: int = 2
    fresh: FreshPolicy = FreshPolicy.RANDOM

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
        )
