import pytest

from clusca_trt.config import ClusCaConfig, FreshPolicy, Method
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
