"""CUDA-graph capture, replay and re-capture decisions, as pure logic (no CUDA here).

A captured CUDA graph bakes in everything its kernels were launched with: the device address
of every buffer read or written, the shapes, the execution contexts. So a graph is keyed by
``GraphKey(sequence of graph names, shapes, addresses)`` and belongs to one *buffer
generation*: when an engine reallocates its buffers the generation changes, and every graph
of the old generation is dropped, never replayed (a new address is a new key; an address
that happens to be reused after reallocation is still a new generation).

    decide(entry, key, generation, config) -> Action     the decision, by table
    GraphCache                                            the entries (LRU-bounded) and graphs
    AnnotationIds                                         stable ids per key (ONNX Runtime's gpu_graph_id)

Ping-pong state makes a sequence alternate between two address sets; each is its own key,
captured once and replayed from then on.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from enum import Enum

from ..errors import ConfigError


class Action(str, Enum):
    EAGER = "eager"  # launch the kernels directly: graphs off, sequence not captured, or still warming up
    CAPTURE = "capture"  # record the sequence into a graph (executes nothing), then replay it
    REPLAY = "replay"  # launch the graph recorded for this key


@dataclass(frozen=True)
class GraphKey:
    """What a captured graph is valid for: the graphs it runs, in order, with their tensor
    shapes and the device address bound to every tensor."""

    sequence: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...] = ()
    addresses: tuple[int, ...] = ()


@dataclass(frozen=True)
class CaptureConfig:
    """enabled:    capture at all.
    warmup:     eager runs of a key before it is captured (TensorRT asks for one enqueue after
                any change of shapes or addresses before a capture).
    capture:    a sequence is captured when its last graph is one of these (the partial and
                forecast steps: many small kernels, run most often).
    max_graphs: keys kept (least recently used dropped first)."""

    enabled: bool = True
    warmup: int = 1
    capture: frozenset = frozenset({"partial", "forecast"})
    max_graphs: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "capture", frozenset(self.capture))
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"CUDA-graph warm-up runs must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ConfigError(f"max CUDA graphs must be an integer >= 1, got {self.max_graphs!r}")


@dataclass(frozen=True)
class Entry:
    """What is known of one key: its buffer generation, eager runs so far, whether captured."""

    generation: int
    eager_runs: int = 0
    captured: bool = False


def capturable(key: GraphKey, config: CaptureConfig) -> bool:
    """Whether ``key`` is ever captured: graphs on, a capturable last graph, every address bound."""
    return (
        config.enabled
        and bool(key.sequence)
        and key.sequence[-1] in config.capture
        and all(a != 0 for a in key.addresses)
    )


def decide(entry: Entry | None, key: GraphKey, generation: int, config: CaptureConfig) -> Action:
    """What to do with ``key`` now. ``entry`` is what was recorded for it (None: never seen)."""
    if not capturable(key, config):
        return Action.EAGER
    if entry is None or entry.generation != generation:  # new, or recorded before a reallocation
        return Action.CAPTURE if config.warmup == 0 else Action.EAGER
    if entry.captured:
        return Action.REPLAY
    return Action.CAPTURE if entry.eager_runs >= config.warmup else Action.EAGER


@dataclass
class GraphCache:
    """Entries and captured graphs by key, for one engine. The engine asks ``plan(key)``,
    does what it says, then calls ``done(key, action, graph)``; ``invalidate()`` after any
    reallocation of the buffers the graphs were captured with."""

    config: CaptureConfig = field(default_factory=CaptureConfig)
    generation: int = 0
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[GraphKey, Entry] = OrderedDict()
        self._graphs: dict[GraphKey, object] = {}

    def plan(self, key: GraphKey) -> Action:
        entry = self._entries.get(key)
        if entry is not None and entry.generation != self.generation:
            self._drop(key)
            entry = None
        return decide(entry, key, self.generation, self.config)

    def graph(self, key: GraphKey) -> object:
        """The graph to replay for ``key`` (only after ``plan`` said REPLAY)."""
        entry = self._entries.get(key)
        if entry is None or not entry.captured or entry.generation != self.generation:
            raise KeyError(f"no graph captured for {key.sequence} in buffer generation {self.generation}")
        return self._graphs[key]

    def done(self, key: GraphKey, action: Action, graph: object | None = None) -> None:
        self.stats[action] += 1
        if not capturable(key, self.config):
            return
        entry = self._entries.pop(key, None) or Entry(self.generation)
        if action is Action.EAGER:
            entry = replace(entry, eager_runs=entry.eager_runs + 1)
        elif action is Action.CAPTURE:
            if graph is None:
                raise ValueError("a capture must hand over its graph")
            entry = replace(entry, captured=True)
            self._graphs[key] = graph
        self._entries[key] = entry  # most recently used last
        while len(self._entries) > self.config.max_graphs:
            self._drop(next(iter(self._entries)))

    def invalidate(self) -> int:
        """Buffers were reallocated: drop every graph (never replay one again). Returns how many."""
        dropped = len(self._graphs)
        self.generation += 1
        self._entries.clear()
        self._graphs.clear()
        return dropped

    def disable(self) -> None:
        """Stop capturing (a capture failed): everything runs eagerly from now on."""
        self.config = replace(self.config, enabled=False)
        self.invalidate()

    def __len__(self) -> int:
        return len(self._graphs)

    def _drop(self, key: GraphKey) -> None:
        self._entries.pop(key, None)
        self._graphs.pop(key, None)


class AnnotationIds:
    """One id per key, for runtimes that capture and replay by an id they manage themselves
    (ONNX Runtime's CUDA provider: run option ``gpu_graph_id``; 0 is reserved, -1 means no
    capture). Ids start at 1; past ``limit`` keys a key gets -1 (runs without a graph)."""

    SKIP = -1

    def __init__(self, limit: int = 16):
        if limit < 1:
            raise ConfigError(f"graph id limit must be >= 1, got {limit}")
        self.limit = limit
        self._ids: dict[GraphKey, int] = {}

    def id_for(self, key: GraphKey) -> int:
        if key in self._ids:
            return self._ids[key]
        if len(self._ids) >= self.limit or any(a == 0 for a in key.addresses):
            return self.SKIP
        self._ids[key] = len(self._ids) + 1
        return self._ids[key]
