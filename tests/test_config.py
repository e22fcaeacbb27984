import pytest

from clusca_trt.config import ClusCaConfig, FreshPolicy, Method, UpdateRule
from clusca_trt.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"interval": 0}, "interval must be an integer >= 1, got 0"),
        ({"interval": -3}, "interval must be an integer >= 1, got -3"),
        ({"clusters": -1}, "clusters must be an integer >= 0"),
        ({"propagation": 1.5}, "propagation (gamma) must be in [0, 1]"),
        ({"order": -1}, "order must be an integer >= 0"),
        ({"warmup": 0}, "warmup must be an integer >= 1"),
        ({"fresh": "best"}, "fresh-token policy must be one of random, nearest, got 'best'"),
        ({"update": "exact"}, "update rule must be one of paper, residual, step, got 'exact'"),
        ({"update": "step", "correction": 1.5}, "correction must be a number in [0, 1] or a list of them"),
        ({"update": "step", "correction": [0.5, -1]}, "correction must be a number in [0, 1] or a list of them"),
        ({"update": "step", "correction": []}, "correction must be a number in [0, 1] or a list of them"),
        ({"update": "step", "correction": True}, "correction must be a number in [0, 1]"),
        ({"correction": 0.5}, "correction applies to the residual update rules: expected 1 with update paper"),
        ({"pair": 1}, "pair must be true or false, got 1"),
    ],
)
def test_invalid_config_is_one_line(kwargs, message):
    with pytest.raises(ConfigError) as e:
        ClusCaConfig(**kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "interval, clusters, order, method",
    [(1, 16, 2, Method.FULL), (5, 16, 2, Method.CLUSCA), (5, 0, 2, Method.TAYLORSEER), (5, 0, 0, Method.FORA)],
)
def test_method_of_config(interval, clusters, order, method):
    assert ClusCaConfig(interval=interval, clusters=clusters, order=order).method is method


@pytest.mark.parametrize(
    "method, kwargs, expect",
    [
        ("clusca", {}, dict(interval=5, clusters=8, order=2)),
        ("clusca", {"order": 1, "interval": 3}, dict(interval=3, clusters=8, order=1)),
        ("taylorseer", {}, dict(clusters=0, order=2)),
        ("fora", {}, dict(clusters=0, order=0)),
        ("full", {}, dict(interval=1, clusters=0)),
        # defaults of FORA (order 0, e.g. chosen by clusca-trt tune): TaylorSeer takes the built order
        ("taylorseer", {"defaults": ClusCaConfig(interval=4, clusters=0, order=0)}, dict(interval=4, order=2)),
        ("clusca", {"defaults": ClusCaConfig(interval=4, clusters=0, order=0)}, dict(clusters=8, order=0)),
    ],
)
def test_for_method(method, kwargs, expect):
    c = ClusCaConfig.for_method(method, built_clusters=8, built_order=2, **kwargs)
    for k, v in expect.items():
        assert getattr(c, k) == v
    assert c.method.value == method


@pytest.mark.parametrize(
    "method, built_k, kwargs, message",
    [
        ("clusca", 8, {"order": 3}, "order must be <= the built Taylor order 2, got 3"),
        ("clusca", 0, {}, "clusca needs engines built with --clusters >= 1"),
        ("taylorseer", 8, {"order": 0}, "taylorseer needs order >= 1"),
        ("full", 8, {"interval": 4}, "interval must be 1"),
        ("clusca", 8, {"interval": 0}, "interval must be an integer >= 1, got 0"),
        ("magic", 8, {}, "method must be one of clusca, taylorseer, fora, full"),
    ],
)
def test_for_method_errors(method, built_k, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClusCaConfig.for_method(method, built_clusters=built_k, built_order=2, **kwargs)


def test_config_is_frozen_and_parses_policy():
    c = ClusCaConfig(fresh="nearest")
    assert c.fresh is FreshPolicy.NEAREST
    with pytest.raises(Exception):
        c.interval = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "update, correction, blocks, fields",
    [
        ("paper", 1.0, 2, ((0.0, 1.0, 1.0),) * 2),  # absolute values, kept
        ("residual", 1.0, 2, ((1.0, 1.0, 1.0),) * 2),  # the forecast's error, kept
        ("step", 1.0, 1, ((1.0, 0.0, 1.0),)),  # the forecast's error, this step only
        ("step", 0.25, 2, ((1.0, 0.0, 0.25),) * 2),
        ("step", [0.0, 1.0, 0.5], 3, ((1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (1.0, 0.0, 0.5))),  # one per block
        ("paper", (1.0, 1.0), 2, ((0.0, 1.0, 1.0),) * 2),
    ],
)
def test_update_fields_by_rule(update, correction, blocks, fields):
    """What the partial graph's ``update`` input gets: (residual, keep, correction) per block."""
    c = ClusCaConfig(update=update, correction=correction)
    assert c.update is UpdateRule(update)
    assert c.update_fields(blocks) == fields


def test_a_correction_per_block_must_match_the_blocks():
    with pytest.raises(ConfigError, match=r"expected one correction per block with fresh rows \(4\), got 2"):
        ClusCaConfig(update="step", correction=(0.0, 1.0)).update_fields(4)


@pytest.mark.parametrize(
    "defaults, kwargs, expect",
    [
        (ClusCaConfig(), {}, dict(update=UpdateRule.PAPER, correction=1.0, pair=False)),
        (ClusCaConfig(), {"update": "step", "correction": 0.5, "pair": True},
         dict(update=UpdateRule.STEP, correction=0.5, pair=True)),
        (ClusCaConfig(update="step", correction=(0.0, 1.0), pair=True), {},
         dict(update=UpdateRule.STEP, correction=(0.0, 1.0), pair=True)),
        # back to the paper's rule: the family's correction does not come along
        (ClusCaConfig(update="step", correction=0.5), {"update": "paper"},
         dict(update=UpdateRule.PAPER, correction=1.0)),
        (ClusCaConfig(update="step", correction=0.5), {"update": "residual"},
         dict(update=UpdateRule.RESIDUAL, correction=0.5)),
    ],
)
def test_for_method_carries_the_update_rule(defaults, kwargs, expect):
    c = ClusCaConfig.for_method("clusca", built_clusters=8, built_order=2, defaults=defaults, **kwargs)
    for k, v in expect.items():
        assert getattr(c, k) == v
