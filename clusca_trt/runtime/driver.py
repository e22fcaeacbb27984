"""The ClusCa cycle over any engine: full step (+ k-means when partial steps follow), then
partial steps (fresh-token selection, partial graph) or forecast steps, by the static plan.

The driver feeds only small host inputs (latents, timesteps, labels, coefficients, random
keys); caches, hidden states, centroids, assignments and fresh indices stay in the engine.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from ..config import ClusCaConfig, FreshPolicy
from ..engines.base import StepEngine
from ..errors import ConfigError
from ..schedule import PlannedStep, StepKind
from ..spec import GRAPH_FORECAST, GRAPH_FULL, GRAPH_PARTIAL


def step_rng(seed: int, chunk: int) -> np.random.Generator:
    """The generator of one chunk's per-step draws (fresh keys, k-means starts, DDPM noise)."""
    return np.random.default_rng([seed, chunk, 1])


class ScheduledDenoiser:
    """Callable ``(step, model_feeds) -> out`` that runs the planned step kind on the engine.

    ``rng`` draws the cold-start centroids and the fresh-token keys, so a seed fixes the run.
    ``propagation`` overrides gamma for some token groups (FLUX text: 0, scatter only, as the
    reference); every other group uses ``config.propagation``.
    ``timings`` collects seconds per graph name (host wall time around each engine call).
    """

    def __init__(
        self,
        engine: StepEngine,
        planned: list[PlannedStep],
        config: ClusCaConfig,
        rng: np.random.Generator,
        propagation: dict[str, float] | None = None,
    ):
        self.engine = engine
        self.spec = engine.spec
        self.planned = planned
        self.config = config
        self.rng = rng
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.groups = self.spec.clustered_groups if config.clusters > 0 else ()
        gammas = dict(propagation or {})
        for name, value in gammas.items():
            if name not in {g.name for g in self.spec.groups}:
                raise ConfigError(f"propagation group must be one of {[g.name for g in self.spec.groups]}, got {name!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"propagation (gamma) of {name} tokens must be in [0, 1], got {value!r}")
        self.gamma = np.array([gammas.get(g.name, config.propagation) for g in self.spec.clustered_groups], np.float32)
        missing = {GRAPH_PARTIAL if p.kind is StepKind.PARTIAL else GRAPH_FORECAST for p in planned if p.kind is not StepKind.FULL}
        missing = [g for g in missing if not engine.has_graph(g)]
        if missing:
            raise ValueError(f"engines lack the {missing[0]} graph this schedule needs")

    def reset(self) -> None:
        self.engine.reset()

    def _run(self, graph: str, feeds: dict) -> np.ndarray | None:
        t0 = time.perf_counter()
        out = self.engine.run(graph, feeds)
        self.timings[graph].append(time.perf_counter() - t0)
        return out

    def __call__(self, step: int, model_feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = None
        for graph, feeds in self.calls(step, model_feeds):
            result = self._run(graph, feeds)
            out = result if result is not None else out
        return out

    def calls(self, step: int, model_feeds: dict[str, np.ndarray]) -> list[tuple[str, dict]]:
        """The graphs that step ``step`` runs, in order, with their host feeds; draws the step's random
        keys and k-means starts from ``rng``. ``__call__`` runs them; a device loop (``runtime.device_loop``)
        collects every step's first and runs them all on the device."""
        p = self.planned[step]
        B = self.spec.graph_batch
        order = self.spec.options.order
        if p.kind is StepKind.FULL:
            feeds = dict(model_feeds)
            if order > 0:
                feeds["taylor_coef"] = p.coef
            calls = [(GRAPH_FULL, feeds)]
            if p.cluster:
                for g in self.groups:
                    init = np.stack([self.rng.choice(g.tokens, g.clusters, replace=False) for _ in range(B)])
                    calls.append((f"cluster_{g.name}", {f"init_{g.name}": init.astype(np.int64),
                                                        "warm": np.array([float(p.warm_start)], np.float32)}))
            return calls
        feeds = dict(model_feeds, forecast_coef=p.coef)
        if p.kind is StepKind.FORECAST:
            return [(GRAPH_FORECAST, feeds)]
        nearest = self.config.fresh is FreshPolicy.NEAREST
        calls = []
        for g in self.groups:
            layers = self.spec.fresh_layers(g.name)
            shape = (layers, B, g.tokens)
            key = np.zeros(shape, np.float32) if nearest else self.rng.random(shape, dtype=np.float32)
            calls.append((f"select_{g.name}",
                          {f"key_{g.name}": key, "dist_weight": np.array([1.0 if nearest else 0.0], np.float32)}))
        feeds["gamma"] = self.gamma
        return calls + [(GRAPH_PARTIAL, feeds)]
