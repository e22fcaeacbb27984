"""CUDA-graph capture / replay / re-capture decisions: pure logic, by table."""

import pytest

from clusca_trt.engines.cuda_graph import (
    Action,
    AnnotationIds,
    CaptureConfig,
    Entry,
    GraphCache,
    GraphKey,
    capturable,
    decide,
)
from clusca_trt.errors import ConfigError

E, C, R = Action.EAGER, Action.CAPTURE, Action.REPLAY
PARTIAL = GraphKey(("select_img", "partial"), ((2, 64), (2, 64)), (4096, 8192))
FULL = GraphKey(("full",), ((2, 4, 8, 8),), (4096,))
ON = CaptureConfig()  # warm-up 1, partial and forecast sequences captured
NO_WARMUP = CaptureConfig(warmup=0)
OFF = CaptureConfig(enabled=False)


@pytest.mark.parametrize(
    "entry, key, generation, config, expected",
    [
        (None, PARTIAL, 0, OFF, E),  # graphs off
        (Entry(0, 5, True), PARTIAL, 0, OFF, E),  # off wins even over a captured graph
        (None, FULL, 0, ON, E),  # full steps are not captured by default
        (None, PARTIAL, 0, ON, E),  # first sight: TensorRT wants one enqueue before capture
        (None, PARTIAL, 0, NO_WARMUP, C),
        (Entry(0, 0), PARTIAL, 0, ON, E),
        (Entry(0, 1), PARTIAL, 0, ON, C),  # warmed up: capture
        (Entry(0, 3), PARTIAL, 0, CaptureConfig(warmup=3), C),
        (Entry(0, 2), PARTIAL, 0, CaptureConfig(warmup=3), E),
        (Entry(0, 1, True), PARTIAL, 0, ON, R),  # captured in this buffer generation: replay
        (Entry(0, 1, True), PARTIAL, 1, ON, E),  # captured before a reallocation: never replay
        (Entry(0, 1, True), PARTIAL, 1, NO_WARMUP, C),  # ... re-capture
        (Entry(2, 1, False), PARTIAL, 3, ON, E),  # stale warm-up counts do not count
        (None, GraphKey(("partial",), ((1,),), (0,)), 0, NO_WARMUP, E),  # an unbound (null) address
        (None, GraphKey((), (), ()), 0, NO_WARMUP, E),
        (None, GraphKey(("forecast",), ((1,),), (64,)), 0, NO_WARMUP, C),
        (None, FULL, 0, CaptureConfig(warmup=0, capture={"full"}), C),
    ],
)
def test_decide(entry, key, generation, config, expected):
    assert decide(entry, key, generation, config) is expected


def test_capturable_needs_the_last_graph_in_the_capture_set():
    assert capturable(PARTIAL, ON)
    assert not capturable(GraphKey(("partial", "select_img"), (), (1, 2)), ON)
    assert not capturable(PARTIAL, CaptureConfig(capture={"forecast"}))


def _step(cache: GraphCache, key: GraphKey, graph: str = "g") -> Action:
    action = cache.plan(key)
    cache.done(key, action, graph if action is Action.CAPTURE else None)
    return action


def test_cache_warms_up_captures_then_replays_the_same_graph():
    cache = GraphCache(ON)
    assert [_step(cache, PARTIAL, "graph-0") for _ in range(4)] == [E, C, R, R]
    assert cache.graph(PARTIAL) == "graph-0"
    assert cache.stats == {E: 1, C: 1, R: 2}


def test_ping_pong_address_sets_are_separate_graphs():
    other = GraphKey(PARTIAL.sequence, PARTIAL.shapes, (8192, 4096))  # the same sequence, buffers swapped
    cache = GraphCache(ON)
    actions = [_step(cache, k, f"graph-{k.addresses[0]}") for k in [PARTIAL, other] * 3]
    assert actions == [E, E, C, C, R, R]
    assert cache.graph(PARTIAL) == "graph-4096" and cache.graph(other) == "graph-8192"
    assert len(cache) == 2


def test_reallocation_drops_every_graph_and_recaptures():
    cache = GraphCache(ON)
    for _ in range(3):
        _step(cache, PARTIAL, "old")
    assert cache.invalidate() == 1
    with pytest.raises(KeyError):
        cache.graph(PARTIAL)
    # the same addresses after reallocation are a new generation: warm up and capture again
    assert [_step(cache, PARTIAL, "new") for _ in range(3)] == [E, C, R]
    assert cache.graph(PARTIAL) == "new"


def test_lru_bound_drops_the_least_recently_used():
    cache = GraphCache(CaptureConfig(warmup=0, max_graphs=2))
    keys = [GraphKey(("partial",), ((1,),), (a,)) for a in (16, 32, 48)]
    _step(cache, keys[0]), _step(cache, keys[1])
    assert _step(cache, keys[0]) is R  # keys[0] is now the most recent
    _step(cache, keys[2])
    assert len(cache) == 2
    assert _step(cache, keys[1]) is C  # evicted: captured anew
    assert _step(cache, keys[2]) is R


def test_disable_runs_everything_eagerly():
    cache = GraphCache(NO_WARMUP)
    _step(cache, PARTIAL)
    cache.disable()
    assert [_step(cache, PARTIAL) for _ in range(3)] == [E, E, E]
    assert len(cache) == 0


def test_capture_must_hand_over_a_graph():
    cache = GraphCache(NO_WARMUP)
    with pytest.raises(ValueError, match="must hand over its graph"):
        cache.done(PARTIAL, cache.plan(PARTIAL), None)


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup": -1}, "warm-up runs must be an integer >= 0, got -1"),
    ({"max_graphs": 0}, "max CUDA graphs must be an integer >= 1, got 0"),
])
def test_capture_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CaptureConfig(**kwargs)


def test_annotation_ids_are_stable_start_at_one_and_skip_past_the_limit():
    ids = AnnotationIds(limit=2)
    a, b, c = (GraphKey(("full",), (), (n,)) for n in (16, 32, 48))
    assert [ids.id_for(a), ids.id_for(b), ids.id_for(a), ids.id_for(c)] == [1, 2, 1, AnnotationIds.SKIP]
    assert AnnotationIds().id_for(GraphKey(("full",), (), (0,))) == AnnotationIds.SKIP
