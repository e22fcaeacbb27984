"""The static ClusCa schedule: which steps are full, and the Taylor coefficients of each step.

Pure functions of (step, config): the whole sampling loop is known before it starts, so
there is no host synchronisation per step and a GPU runtime can capture it ahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .config import ClusCaConfig
from .errors import ConfigError

MAX_STEPS = 10_000  # sampling steps a schedule may have (checked before it is built)


class StepKind(str, Enum):
    FULL = "full"  # all tokens; refresh the caches (and cluster, if a partial step follows)
    PARTIAL = "partial"  # K fresh rows per block + propagation; attention forecast
    FORECAST = "forecast"  # K = 0: every branch forecast (TaylorSeer, FORA)


def step_kind(step: int, interval: int, warmup: int, clusters: int = 1) -> StepKind:
    """Step ``s`` is FULL if ``s < W`` or ``(s - (W - 1)) % N == 0``, else PARTIAL (FORECAST if K = 0)."""
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    if interval < 1:
        raise ConfigError(f"interval must be >= 1, got {interval}")
    if warmup < 1:
        raise ConfigError(f"warmup must be >= 1, got {warmup}")
    if step < warmup or (step - (warmup - 1)) % interval == 0:
        return StepKind.FULL
    return StepKind.PARTIAL if clusters > 0 else StepKind.FORECAST


@dataclass(frozen=True)
class PlannedStep:
    """One step of the plan.

    kind:        the step kind.
    coef:        FULL: ``taylor_coef[i]`` = 1/dt if order i+1 has enough history, else 0 (length O_built).
                 PARTIAL/FORECAST: ``forecast_coef[i]`` = d^i / i! for i <= O, 0 above (length O_built + 1).
    distance:    dt (FULL, steps since the previous full step; 0 for the first) or d (steps since the last full step).
    cluster:     FULL only: whether k-means runs after this step (a partial step follows).
    warm_start:  whether that k-means starts from the previous centroids.
    cache:       FULL only: whether the step must refresh the caches (a partial or forecast step
                 comes later); a full step that feeds no cache runs the model alone (``plain``).
    """

    kind: StepKind
    coef: np.ndarray
    distance: int
    cluster: bool = False
    warm_start: bool = False
    cache: bool = True


def plan(steps: int, config: ClusCaConfig, built_order: int) -> list[PlannedStep]:
    """The whole schedule for ``steps`` sampling steps."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if config.order > built_order:
        raise ConfigError(f"order must be <= the built order {built_order}, got {config.order}")
    kinds = [step_kind(s, config.interval, config.warmup, config.clusters) for s in range(steps)]
    out: list[PlannedStep] = []
    last_full = None
    fulls_seen = 0
    clustered_before = False
    for s, kind in enumerate(kinds):
        if kind is StepKind.FULL:
            dt = 0 if last_full is None else s - last_full
            coef = np.zeros(built_order, dtype=np.float32)
            for i in range(built_order):
                if fulls_seen >= i + 1:
                    coef[i] = 1.0 / dt
            cluster = s + 1 < steps and kinds[s + 1] is StepKind.PARTIAL
            cache = any(k is not StepKind.FULL for k in kinds[s + 1 :])
            out.append(PlannedStep(kind, coef, dt, cluster=cluster, warm_start=cluster and clustered_before, cache=cache))
            clustered_before = clustered_before or cluster
            last_full = s
            fulls_seen += 1
        else:
            d = s - last_full
            coef = np.zeros(built_order + 1, dtype=np.float32)
            for i in range(config.order + 1):
                coef[i] = d**i / math.factorial(i)
            out.append(PlannedStep(kind, coef, d))
    return out


def count_kinds(planned: list[PlannedStep]) -> dict[StepKind, int]:
    counts = {k: 0 for k in StepKind}
    for p in planned:
        counts[p.kind] += 1
    return counts
