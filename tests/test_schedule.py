import math

import numpy as np
import pytest

from clusca_trt.config import ClusCaConfig
from clusca_trt.schedule import StepKind, count_kinds, plan, step_kind

F, P, C = StepKind.FULL, StepKind.PARTIAL, StepKind.FORECAST


@pytest.mark.parametrize(
    "interval, warmup, clusters, kinds",
    [
        (1, 2, 16, [F] * 8),
        (5, 2, 16, [F, F, P, P, P, P, F, P]),  # s=1 and s=6 satisfy (s - (W-1)) % N == 0
        (4, 2, 16, [F, F, P, P, P, F, P, P]),
        (3, 1, 16, [F, P, P, F, P, P, F, P]),
        (5, 3, 16, [F, F, F, P, P, P, P, F]),  # FLUX-like W=3
        (5, 2, 0, [F, F, C, C, C, C, F, C]),  # K=0: forecast steps
        (2, 1, 4, [F, P, F, P, F, P, F, P]),
    ],
)
def test_step_kind_table(interval, warmup, clusters, kinds):
    assert [step_kind(s, interval, warmup, clusters) for s in range(len(kinds))] == kinds


def test_plan_taylor_and_forecast_coefficients():
    cfg = ClusCaConfig(interval=3, clusters=4, order=2, warmup=1)
    p = plan(8, cfg, built_order=2)
    assert [s.kind for s in p] == [F, P, P, F, P, P, F, P]
    # first full: no history; second: order 1 only (dt = 3); third: orders 1 and 2
    np.testing.assert_array_equal(p[0].coef, [0, 0])
    np.testing.assert_allclose(p[3].coef, [1 / 3, 0])
    np.testing.assert_allclose(p[6].coef, [1 / 3, 1 / 3])
    # partial: d^i / i!
    np.testing.assert_allclose(p[2].coef, [1, 2, 2**2 / math.factorial(2)])
    assert p[2].distance == 2
    assert p[0].cluster and not p[0].warm_start and p[3].warm_start


def test_plan_lower_order_zeroes_higher_factors():
    cfg = ClusCaConfig(interval=4, clusters=4, order=0, warmup=2)
    p = plan(6, cfg, built_order=2)
    np.testing.assert_array_equal(p[3].coef, [1, 0, 0])


def test_plan_clusters_only_before_partial_steps():
    cfg = ClusCaConfig(interval=5, clusters=4, order=1, warmup=2)
    p = plan(10, cfg, built_order=1)
    assert [s.cluster for s in p if s.kind is F] == [False, True, True]
    assert count_kinds(p) == {F: 3, P: 7, C: 0}
    full = plan(10, cfg.replace(interval=1), built_order=1)
    assert not any(s.cluster for s in full)
