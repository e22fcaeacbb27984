"""The ClusCa cycle over any engine, by the static plan: conditioning tables (the ``cond`` graph,
once per ``cond_steps`` steps), then per step the full graph (+ k-means when partial steps
follow), the partial graph (after fresh-token selection) or the forecast graph; ``plain`` for a
full step whose caches nothing reads (method full).

The denoiser feeds only small host inputs (latents, table rows, coefficients, random keys);
caches, conditioning tables, hidden states, centroids, assignments and fresh indices stay in the
engine.

Randomness is per sample: every sample of a chunk has its own key ``(seed, index)`` and from it
its own streams (``sample_streams``), so a sample's result depends on its own key alone, whatever
else shares its engine batch. Everything the ClusCa cycle draws (k-means cold-start tokens,
fresh-token keys) is drawn when a run starts (``RandomPlan``), for the whole run: no step waits
for a host draw, and a device loop can take the whole plan in one upload.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..config import ClusCaConfig, FreshPolicy
from ..engines.base import StepEngine
from ..errors import ConfigError, InputError, NonFiniteOutputError
from ..schedule import PlannedStep, StepKind
from ..spec import (COND_ROW, GRAPH_COND, GRAPH_FORECAST, GRAPH_FULL, GRAPH_PARTIAL, GRAPH_PLAIN, PAIR, UPDATE,
                    ExportSpec)

# stream numbers of a sample key: initial noise (drawn by the family runtime), the ClusCa cycle's
# draws (this module), the sampler's own noise (DDPM)
NOISE, CLUSCA, SAMPLER = 0, 1, 2
PAD_KEY = (0xC1A5CA, 0)  # the key of the zero rows that pad a chunk to the engine batch


SampleKey = tuple[int, int]


def sample_keys(seed: int, n: int) -> list[SampleKey]:
    """The keys of ``n`` samples generated with ``seed``: ``(seed, 0) .. (seed, n - 1)``."""
    return [(int(seed), j) for j in range(n)]


def stream(key: SampleKey, which: int) -> np.random.Generator:
    """Stream ``which`` (NOISE, CLUSCA, SAMPLER) of one sample."""
    seed, index = key
    return np.random.default_rng([seed, index, which])


# noise values a call may draw beyond its samples' own (a key (seed, j) draws the j rows before its
# own): 2**24 float32 values, 64 MiB and a fraction of a second
NOISE_BUDGET = 2**24


def check_noise_cost(keys: list[SampleKey], shape: tuple[int, ...]) -> None:
    """Refuse keys whose noise costs more than the samples': sample ``(seed, j)`` is row ``j`` of its
    seed's draws, so the rows below ``j`` that no key asks for are drawn for nothing. At most
    ``NOISE_BUDGET`` such values per call (an ``InputError`` naming the largest index otherwise),
    whatever the sample size: index 99999 of a 1024-value sample is 100 M values, of a FLUX
    1024 px latent 26 G."""
    per_sample = math.prod(int(d) for d in shape)
    wasted, worst = 0, None
    for seed in {k[0] for k in keys}:
        indices = {k[1] for k in keys if k[0] == seed}
        top = max(indices)
        wasted += (top + 1 - len(indices)) * per_sample
        if worst is None or top > worst[1]:
            worst = (seed, top)
    if wasted > NOISE_BUDGET:
        seed, top = worst
        raise InputError(
            f"keys: sample index {top} of seed {seed} needs the noise of the {top} samples before it drawn first; "
            f"expected at most {NOISE_BUDGET} noise values ({NOISE_BUDGET // per_sample} samples of "
            f"{per_sample} values) drawn beyond the requested samples' own, got {wasted}; use smaller indices"
        )


def initial_noise(keys: list[SampleKey], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise [n, *shape], one sample per key: sample ``(seed, j)`` is row ``j`` of
    ``default_rng(seed).standard_normal((m, *shape))`` for any ``m > j`` (numpy fills row by
    row), so ``n`` samples of one seed alone are ``standard_normal((n, *shape))``. The cost of
    keys with large indices is bounded first (``check_noise_cost``)."""
    check_noise_cost(keys, shape)
    out = np.empty((len(keys), *shape), np.float32)
    by_seed: dict[int, list[int]] = defaultdict(list)
    for i, (seed, _) in enumerate(keys):
        by_seed[seed].append(i)
    for seed, rows in by_seed.items():
        drawn = np.random.default_rng(seed).standard_normal((max(keys[i][1] for i in rows) + 1, *shape), dtype=np.float32)
        for i in rows:
            out[i] = drawn[keys[i][1]]
    return out


@dataclass(frozen=True)
class RandomPlan:
    """Every draw of one run, by step: ``init[step][group]`` [graph batch, K] distinct cold-start
    tokens of a clustering; ``keys[step][group]`` [layers, graph batch, tokens] fresh-token keys of
    a partial step (uniform noise; zeros with ``--fresh nearest``)."""

    init: dict[int, dict[str, np.ndarray]]
    keys: dict[int, dict[str, np.ndarray]]

    @classmethod
    def draw(cls, spec: ExportSpec, planned: list[PlannedStep], groups, fresh: FreshPolicy,
             keys: list[SampleKey], pair: bool = False) -> "RandomPlan":
        """Graph row ``r`` belongs to sample ``r % batch`` (classifier-free guidance: the cond and
        uncond rows of a sample); each sample draws its rows' values from its own CLUSCA stream, in
        plan order. ``pair``: a sample draws its fresh-token keys once, for all its rows (which
        share one clustering), so its rows compute the same fresh tokens."""
        batch, rows = len(keys), spec.graph_batch
        if rows % batch:
            raise ConfigError(f"expected a key per sample of the engine batch, got {batch} for {rows} graph rows")
        init: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        fresh_keys: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        for s, p in enumerate(planned):
            for g in groups:
                if p.kind is StepKind.FULL and p.cluster:
                    init[s][g.name] = np.empty((rows, g.clusters), np.int64)
                elif p.kind is StepKind.PARTIAL:
                    fresh_keys[s][g.name] = np.zeros((spec.fresh_layers(g.name), rows, g.tokens), np.float32)
        draw_keys = fresh is not FreshPolicy.NEAREST
        for i, key in enumerate(keys):
            rng = stream(key, CLUSCA)
            own = range(i, rows, batch)
            for s, p in enumerate(planned):
                for g in groups:
                    if s in init and g.name in init[s]:
                        for r in own:
                            init[s][g.name][r] = rng.choice(g.tokens, g.clusters, replace=False)
                    elif draw_keys and s in fresh_keys and g.name in fresh_keys[s]:
                        for r in own:
                            into = fresh_keys[s][g.name]
                            if pair and r != i:  # the sample's other rows: its first row's keys
                                into[:, r] = into[:, i]
                            else:
                                into[:, r] = rng.random((spec.fresh_layers(g.name), g.tokens), np.float32)
        return cls(dict(init), dict(fresh_keys))


class Denoiser:
    """One sampling run's model: ``(step, feeds) -> out``, the model output of the graph batch.

    The family runtimes sample over a ``Denoiser``: the engines' ``ScheduledDenoiser``, or a plain
    model call (``ModelCall``, the test oracle). ``condition`` takes every step's conditioning
    inputs before the first step (engines with a ``cond`` graph compute them ahead; a model call
    needs nothing); ``loop_engine`` is the engine that can run a whole chunk's loop on its device,
    or None (step by step)."""

    loop_engine: StepEngine | None = None

    def __call__(self, step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def condition(self, step_feeds: list[dict[str, np.ndarray]]) -> None:
        """Every step's conditioning inputs, ahead (default: not needed)."""


class ModelCall(Denoiser):
    """A plain function ``(step, feeds) -> out`` as a ``Denoiser``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, step, feeds):
        return self.fn(step, feeds)


def as_denoiser(denoise) -> Denoiser:
    """``denoise`` itself if it is a ``Denoiser``, else the plain function wrapped as one."""
    return denoise if isinstance(denoise, Denoiser) else ModelCall(denoise)


class ScheduledDenoiser(Denoiser):
    """``(step, feeds) -> out``: runs the planned step kind on the engine; a non-finite ``out`` stops
    the run at its step (``NonFiniteOutputError``: one ``np.isfinite`` over the small model output).

    ``keys``: one per sample of the engine batch (``PAD_KEY`` for padding); they fix every draw of
    the run. ``propagation`` overrides gamma for some token groups (FLUX text: 0, scatter only, as
    the reference); every other group uses ``config.propagation``. Before the first step the
    family runtime hands over every step's conditioning inputs (``condition``), when the engines
    have a ``cond`` graph. ``timings`` collects seconds per graph name (host wall time per call).
    """

    def __init__(
        self,
        engine: StepEngine,
        planned: list[PlannedStep],
        config: ClusCaConfig,
        keys: list[SampleKey],
        propagation: dict[str, float] | None = None,
    ):
        self.engine = engine
        self.spec = engine.spec
        self.planned = planned
        self.config = config
        self.keys = list(keys)
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.groups = self.spec.clustered_groups if config.clusters > 0 else ()
        gammas = dict(propagation or {})
        for name, value in gammas.items():
            if name not in {g.name for g in self.spec.groups}:
                raise ConfigError(f"propagation group must be one of {[g.name for g in self.spec.groups]}, got {name!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"propagation (gamma) of {name} tokens must be in [0, 1], got {value!r}")
        self.gamma = np.array([gammas.get(g.name, config.propagation) for g in self.spec.clustered_groups], np.float32)
        # the partial graph's update rule per block (only ClusCa runs one)
        self.update = np.array(config.update_fields(self.spec.update_blocks), np.float32) if self.groups else None
        needed = {self.graph_of(p) for p in planned}
        missing = sorted(g for g in needed if not engine.has_graph(g))
        if missing:
            raise ConfigError(f"engines lack the {missing[0]} graph this schedule needs; rebuild with clusca-trt build")
        self._cond_feeds: list[dict[str, np.ndarray]] | None = None
        self._cond_chunk = -1
        self.random: RandomPlan | None = None

    @staticmethod
    def graph_of(p: PlannedStep) -> str:
        if p.kind is StepKind.FULL:
            return GRAPH_FULL if p.cache else GRAPH_PLAIN
        return GRAPH_PARTIAL if p.kind is StepKind.PARTIAL else GRAPH_FORECAST

    def reset(self) -> None:
        """Zero the engine's state and draw the run's randomness."""
        self.engine.reset()
        self._cond_feeds, self._cond_chunk = None, -1
        self.random = RandomPlan.draw(self.spec, self.planned, self.groups, self.config.fresh, self.keys,
                                      self.config.pair)

    def condition(self, step_feeds: list[dict[str, np.ndarray]]) -> None:
        """Every step's conditioning inputs (``spec.cond_inputs``, each ``[graph batch]``), ahead."""
        if len(step_feeds) != len(self.planned):
            raise ConfigError(f"expected conditioning for {len(self.planned)} steps, got {len(step_feeds)}")
        self._cond_feeds = step_feeds
        self._cond_chunk = -1

    def _tables(self, step: int) -> tuple[list[tuple[str, dict]], dict[str, np.ndarray]]:
        """(the cond graph call that fills the tables with ``step``'s rows, if they do not hold them
        yet; ``step``'s ``cond_row`` feed)."""
        spec = self.spec
        if not spec.cond_tensors:
            return [], {}
        if self._cond_feeds is None:
            raise ConfigError("expected the steps' conditioning (ScheduledDenoiser.condition) before the first step, got none")
        per, rows = spec.options.cond_steps, spec.graph_batch
        chunk = step // per
        calls = []
        if chunk != self._cond_chunk:
            steps = [min(s, len(self._cond_feeds) - 1) for s in range(chunk * per, (chunk + 1) * per)]
            feeds = {t.name: np.concatenate([self._cond_feeds[s][t.name] for s in steps]) for t in spec.cond_inputs}
            calls.append((GRAPH_COND, feeds))
            self._cond_chunk = chunk
        return calls, {COND_ROW: np.arange(rows, dtype=np.int64) + (step % per) * rows}

    def _run(self, graph: str, feeds: dict) -> np.ndarray | None:
        t0 = time.perf_counter()
        out = self.engine.run(graph, feeds)
        self.timings[graph].append(time.perf_counter() - t0)
        return out

    @property
    def loop_engine(self) -> StepEngine | None:
        return self.engine if self.engine.device_loop else None

    def __call__(self, step: int, model_feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = None
        for graph, feeds in self.calls(step, model_feeds):
            result = self._run(graph, feeds)
            out = result if result is not None else out
        if not np.isfinite(out).all():
            raise NonFiniteOutputError(
                f"the model output at step {step} is not finite: expected finite values, got NaN/inf; "
                f"stopped before writing anything (check the weights, inputs and guidance scale)"
            )
        return out

    def calls(self, step: int, model_feeds: dict[str, np.ndarray]) -> list[tuple[str, dict]]:
        """The graphs step ``step`` runs, in order, with their host feeds (the last one returns ``out``).
        ``__call__`` runs them; a device loop (``runtime.device_loop``) collects every step's and runs
        them all on the device. Call in step order: the conditioning tables are filled as needed."""
        p = self.planned[step]
        calls, rows = self._tables(step)
        feeds = dict(model_feeds, **rows)
        if p.kind is StepKind.FULL:
            if not p.cache:
                return calls + [(GRAPH_PLAIN, feeds)]
            if self.spec.options.order > 0:
                feeds["taylor_coef"] = p.coef
            calls.append((GRAPH_FULL, feeds))
            if p.cluster:
                warm = np.array([float(p.warm_start)], np.float32)
                pair = np.array([float(self.config.pair)], np.float32)
                for g in self.groups:
                    calls.append((f"cluster_{g.name}", {f"init_{g.name}": self.random.init[step][g.name], "warm": warm,
                                                       PAIR: pair}))
            return calls
        feeds["forecast_coef"] = p.coef
        if p.kind is StepKind.FORECAST:
            return calls + [(GRAPH_FORECAST, feeds)]
        weight = np.array([1.0 if self.config.fresh is FreshPolicy.NEAREST else 0.0], np.float32)
        for g in self.groups:
            calls.append((f"select_{g.name}", {f"key_{g.name}": self.random.keys[step][g.name], "dist_weight": weight}))
        feeds["gamma"] = self.gamma
        feeds[UPDATE] = self.update
        return calls + [(GRAPH_PARTIAL, feeds)]
