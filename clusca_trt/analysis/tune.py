"""``clusca-trt tune``: the fastest ClusCa / TaylorSeer / FORA settings of one build that keep a
quality floor, measured on this machine with the backend the user runs.

    pipe, calibration inputs, TuneSettings -> tune(...) -> TuneResult (the chosen settings, the
    Pareto front of speed-up vs PSNR, every candidate tried) -> format_front / to_dict / plot_front

What it does, in order:

1. Full compute on the calibration set (``--samples`` class labels, prompts or embeddings, one seed):
   the reference every candidate's final images (latents where the build has no decoder) are
   scored against, sample by sample (PSNR, SSIM; same seed, so the same initial noise).
2. The candidate space: the table ``DIMENSIONS`` (a ClusCaConfig field, the methods it applies to,
   its values for this build) expanded per method into *lines*: every setting but the interval N
   fixed, N ascending (a larger N: fewer full steps, faster). K is static in the graphs: ClusCa
   runs the built K, TaylorSeer and FORA K = 0.
3. Speed comes from a cost model, not from timing every candidate: the median time of each graph
   kind's call (full, plain, partial, select, cluster, forecast, cond) over every call of every run
   so far, times the calls the candidate's schedule makes, plus the host's median time per step
   (backends that run whole loops on a device report no per-call times: there the per-kind costs
   are fitted to the runs' times by least squares). The model is refitted after every run.
4. The search (speed objective, quality floors): first the slowest, best point (N = 2) of each
   method's default line, on a few samples: the high end of the front, and where every one of them
   misses the floor clearly, the floor is out of reach (the error says the best PSNR found). Then the
   candidates in order of predicted speed-up, fastest first, each against the bound: the predicted
   speed-up of the best candidate that passed so far (1.0, full compute, at the start; what
   ``max_seconds`` needs, where given). The first candidate to pass is the fastest that passes, so
   every slower candidate is pruned without a run, and no assumption that quality falls as N grows
   is needed (it need not: where the last full step of a 50-step schedule falls matters). Fast
   candidates are cheap to run and most fail on their first few samples. Then two points above the
   chosen one on its line (smaller N), for the front between the floor and the anchors.
5. Samples where they decide something: a candidate runs on the first ``first_samples`` calibration
   samples; one that misses a floor by more than ``z_fail`` standard errors is rejected there, any
   other gets more samples (doubling) up to the whole set, where it passes only with ``z`` standard
   errors to spare. The Pareto front's members are brought to the whole set too.
6. The front is re-timed (interleaved rounds with full compute, medians of the per-round ratios, as
   ``bench``), and the chosen setting is the fastest measured candidate that meets every floor.

With only ``max_seconds`` (no floor), the objective is PSNR: on each line the smallest N whose
predicted time per engine call fits is taken as its best point (here quality is assumed not to
rise with N); the best of those (more samples for the close ones, re-timed) is chosen.

Everything stops at the budget (``budget_seconds``, the first runs included): what was found by
then is the result, marked ``stopped_early``. The decisions (dominance, the front, the verdict on a
floor, the next candidate, the next sample count) are pure functions below, tested by table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from itertools import product
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..config import ClusCaConfig, Method
from ..errors import ClusCaError, ConfigError, InputError
from ..files import write_atomic
from ..schedule import StepKind, plan
from .flops import KINDS, graph_kind, schedule_flops

log = logging.getLogger(__name__)

FORMAT = 1
PSNR_CAP = 100.0  # dB of an image identical to the reference (inf would swamp every mean)
SEARCHED = (Method.CLUSCA.value, Method.TAYLORSEER.value, Method.FORA.value)


class TuneError(ClusCaError):
    """No setting meets the request (a floor no candidate reaches, a budget too small)."""


# ------------------------------------------------------------------------------------------
# the candidate space


@dataclass(frozen=True)
class Build:
    """What a build allows: its K (0: no clustering), its Taylor order, the run's steps, the largest
    interval to try, and its run defaults (the values of fields a method does not search)."""

    clusters: int
    order: int
    steps: int
    defaults: ClusCaConfig
    max_interval: int = 12


@dataclass(frozen=True)
class Dimension:
    """One searched ``ClusCaConfig`` field: the methods it applies to and its values on a build
    (a tuple, or a function of the ``Build``). A field ``ClusCaConfig`` does not have is skipped, so
    a row may name a field another branch adds; a combination ``ClusCaConfig`` refuses is dropped."""

    field: str
    methods: tuple[str, ...]
    values: tuple | Callable[[Build], tuple]

    def values_for(self, build: Build) -> tuple:
        return tuple(self.values(build) if callable(self.values) else self.values)


def _intervals(b: Build) -> tuple[int, ...]:
    return tuple(range(2, max(2, min(b.max_interval, b.steps - 1)) + 1))


def _with_default(name: str, values: tuple) -> Callable[[Build], tuple]:
    """``values`` and the build's default of ``name``."""
    return lambda b: tuple(sorted(set(values) | {getattr(b.defaults, name)}))


def _corrections(b: Build) -> tuple:
    """1 (the whole correction) and the build's default share, where that is one number."""
    default = b.defaults.correction
    return tuple(sorted({1.0} | ({float(default)} if isinstance(default, (int, float)) else set())))


# One row per searched field (add a field: add a row). interval must be there: it spans the lines.
DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("interval", SEARCHED, _intervals),
    Dimension("warmup", SEARCHED, _with_default("warmup", (1, 2, 3))),
    Dimension("order", ("taylorseer",), lambda b: tuple(range(1, b.order + 1))),
    Dimension("order", ("clusca",), lambda b: tuple(range(0, b.order + 1))),
    Dimension("propagation", ("clusca",), _with_default("propagation", (0.0, 0.02))),
    Dimension("fresh", ("clusca",), ("random", "nearest")),
    # the update rules (ClusCaConfig drops the combinations it refuses: a correction other than 1
    # with the paper's rule); guidance-row pairing keeps the build's default
    Dimension("update", ("clusca",), ("paper", "residual", "step")),
    Dimension("correction", ("clusca",), _corrections),
)


@dataclass(frozen=True)
class Line:
    """Candidates that differ only in the interval N, ascending."""

    method: str
    configs: tuple[ClusCaConfig, ...]

    @property
    def key(self) -> tuple:
        return line_key(self.configs[0])

    @property
    def intervals(self) -> tuple[int, ...]:
        return tuple(c.interval for c in self.configs)

    def at(self, interval: int) -> ClusCaConfig:
        return next(c for c in self.configs if c.interval == interval)


def line_key(config: ClusCaConfig) -> tuple:
    """Every setting of ``config`` but the interval: what a line shares."""
    return tuple((f.name, _plain(getattr(config, f.name))) for f in dataclasses.fields(config) if f.name != "interval")


def _plain(v):
    return v.value if isinstance(v, Enum) else v


def caches_something(config: ClusCaConfig, steps: int, built_order: int) -> bool:
    """Whether the schedule has a step that is not full (else the candidate is full compute)."""
    return any(p.kind is not StepKind.FULL for p in plan(steps, config, built_order))


def candidate_space(build: Build, dimensions: Sequence[Dimension] = DIMENSIONS) -> list[Line]:
    """Every runnable candidate of ``build``, as lines (one per method and setting other than N).

    Each method starts from the build's defaults (the fields nobody searches keep them) with K set
    for the method (ClusCa: the built K; TaylorSeer, FORA: 0; FORA also O = 0), then takes every
    combination of its dimensions' values. Dropped: fields ``ClusCaConfig`` lacks, combinations it
    refuses, orders above the built one, schedules without a cached step."""
    fields = {f.name for f in dataclasses.fields(ClusCaConfig)}
    methods = [m for m in SEARCHED
               if not (m == "clusca" and build.clusters < 1) and not (m == "taylorseer" and build.order < 1)]
    lines: dict[tuple, list[ClusCaConfig]] = {}
    for method in methods:
        order = {"fora": 0, "taylorseer": build.order}.get(method)  # searched anyway; valid to start from
        base = ClusCaConfig.for_method(method, built_clusters=build.clusters, built_order=build.order,
                                       defaults=build.defaults, order=order)
        dims = [d for d in dimensions if method in d.methods and d.field in fields]
        names = [d.field for d in dims]
        for values in product(*(d.values_for(build) for d in dims)):
            try:
                config = base.replace(**dict(zip(names, values)))
            except (ClusCaError, TypeError, ValueError):
                continue
            if config.method.value != method or config.order > build.order:
                continue
            if not caches_something(config, build.steps, build.order):
                continue
            lines.setdefault(line_key(config), []).append(config)
    out = []
    for configs in lines.values():
        unique = {c.interval: c for c in configs}
        out.append(Line(configs[0].method.value, tuple(unique[n] for n in sorted(unique))))
    return out


def label(config: ClusCaConfig) -> str:
    """The method and the settings it uses, in a few words: "taylorseer N=6 O=2 W=1"."""
    m = config.method.value
    if m == "full":
        return "full"
    parts = [m, f"N={config.interval}"]
    if m in ("clusca", "taylorseer"):
        parts.append(f"O={config.order}")
    parts.append(f"W={config.warmup}")
    if m == "clusca":
        parts += [f"K={config.clusters}", f"g={config.propagation:g}", f"fresh={_plain(config.fresh)}"]
        for f in dataclasses.fields(config):  # fields added later (update, ...): shown where not the default
            if f.name not in {"interval", "clusters", "propagation", "order", "warmup", "fresh"}:
                v = _plain(getattr(config, f.name))
                if f.default is dataclasses.MISSING or v != _plain(f.default):
                    parts.append(f"{f.name}={v}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------
# pure decisions


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    UNSURE = "unsure"  # more samples decide


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` = (speed, quality) is at least as fast and as good as ``b``, and better in one."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, fastest first (equal points both stay)."""
    keep = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(keep, key=lambda i: (-points[i][0], -points[i][1]))


def standard_error(values: Sequence[float], sd_prior: float) -> float:
    """Standard error of the mean of ``values``; the sample's spread is not trusted below ``sd_prior``
    (two samples can agree by chance)."""
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    return max(sd, sd_prior) / math.sqrt(max(n, 1))


def verdict(values: Sequence[float], floor: float, final: bool, sd_prior: float, z: float = 1.0,
            z_fail: float = 2.0) -> Verdict:
    """Whether per-sample scores ``values`` meet ``floor`` (their mean, on the calibration set).

    Before the whole set (``final`` False): FAIL where the mean is more than ``z_fail`` standard
    errors below the floor, else UNSURE (more samples). On the whole set: PASS only with ``z``
    standard errors to spare, so that other seeds meet it too; else FAIL."""
    if not values:
        return Verdict.UNSURE
    mean = float(np.mean(values))
    se = standard_error(values, sd_prior)
    if final:
        return Verdict.PASS if mean - z * se >= floor else Verdict.FAIL
    return Verdict.FAIL if mean + z_fail * se < floor else Verdict.UNSURE


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """All floors: FAIL if one fails, PASS if all pass, else UNSURE."""
    vs = list(verdicts)
    if Verdict.FAIL in vs:
        return Verdict.FAIL
    return Verdict.PASS if vs and all(v is Verdict.PASS for v in vs) else Verdict.UNSURE


def next_candidate(speeds: dict, bound: float, decided: set):
    """The next candidate to run (speed objective): the fastest by predicted speed-up ``speeds``
    among those not yet decided that beat ``bound`` (the best that passed so far). Run in this order,
    the first that passes is the fastest that passes: nothing slower needs a run, and nothing
    assumes that quality falls with N (on 50 steps it need not: where the last full step falls
    matters). None: nothing left can beat the bound."""
    pending = [(s, i) for i, (k, s) in enumerate(speeds.items()) if s > bound and k not in decided]
    if not pending:
        return None
    return list(speeds)[max(pending)[1]]


def best_within(times: dict[int, float], max_seconds: float) -> int | None:
    """The smallest N (the best quality on a line) whose predicted seconds fit ``max_seconds``."""
    fits = [n for n, t in times.items() if t <= max_seconds]
    return min(fits) if fits else None


def next_samples(have: int, total: int, batch: int, first: int) -> int:
    """How many calibration samples a candidate runs on next: ``first`` (at least one engine batch),
    then twice what it has, in whole engine batches, at most ``total``."""
    want = max(first, batch) if have == 0 else 2 * have
    want = batch * math.ceil(want / batch)
    return min(total, max(want, have + 1))


# ------------------------------------------------------------------------------------------
# the cost model


class CostModel:
    """Seconds of one engine call of ``config``'s schedule (one chunk of the engine batch), from the
    median call time of every graph kind seen so far and the host's median time per step; where a
    backend reports no per-call times (a device loop), per-kind costs fitted to the runs' times."""

    def __init__(self, spec, built_order: int, steps: int):
        self.spec, self.built_order, self.steps = spec, built_order, steps
        self.calls: dict[str, list[float]] = {k: [] for k in KINDS}
        self.host: list[float] = []
        self.runs: list[tuple[np.ndarray, float]] = []  # (calls per kind + steps, seconds per chunk)
        self._graphs = {name: 0 for name in spec.graphs}
        self._fit: np.ndarray | None = None
        self._cache: dict[ClusCaConfig, np.ndarray] = {}

    def counts(self, config: ClusCaConfig, steps: int | None = None) -> np.ndarray:
        """Calls per graph kind of one chunk's run of ``steps`` (default: the tune's) steps (``KINDS``
        order), then the step count."""
        steps = steps or self.steps
        if (config, steps) not in self._cache:
            sched = schedule_flops(self._graphs, self.spec, plan(steps, config, self.built_order), config.clusters > 0)
            self._cache[config, steps] = np.array([sched.calls[k] for k in KINDS] + [steps], np.float64)
        return self._cache[config, steps]

    def observe(self, config: ClusCaConfig, seconds: float, timings: dict[str, list[float]], chunks: int,
                steps: int | None = None) -> None:
        """One run of ``chunks`` engine calls' worth of samples, ``steps`` steps, that took ``seconds``."""
        per_chunk = seconds / max(chunks, 1)
        steps = steps or self.steps
        self.runs.append((self.counts(config, steps), per_chunk))
        self._fit = None
        if timings:
            for graph, times in timings.items():
                self.calls.setdefault(graph_kind(graph), []).extend(times)
            busy = sum(sum(t) for t in timings.values())
            self.host.append(max(seconds - busy, 0.0) / (steps * max(chunks, 1)))

    def _costs(self) -> np.ndarray:
        """Seconds per call of each kind, then per step of the host."""
        if self.host:  # per-call times: medians
            return np.array([statistics.median(self.calls[k]) if self.calls.get(k) else 0.0 for k in KINDS]
                            + [statistics.median(self.host)])
        if self._fit is None:
            if not self.runs:
                raise ConfigError("expected at least one timed run before predicting, got none")
            a = np.stack([c for c, _ in self.runs])
            b = np.array([s for _, s in self.runs])
            # least squares (minimum norm: kinds that always come together, e.g. select and partial,
            # share their cost; a schedule is a sum of the same kinds, so its prediction holds)
            self._fit, *_ = np.linalg.lstsq(a, b, rcond=None)
        return self._fit

    def seconds(self, config: ClusCaConfig) -> float:
        """Predicted seconds of one engine call (one chunk) of ``config`` (at least a microsecond)."""
        return max(float(self.counts(config) @ self._costs()), 1e-6)

    def speedup(self, config: ClusCaConfig, full: ClusCaConfig) -> float:
        return self.seconds(full) / max(self.seconds(config), 1e-12)


# ------------------------------------------------------------------------------------------
# settings, candidates and the result


@dataclass(frozen=True)
class TuneSettings:
    """What ``tune`` looks for.

    min_psnr / min_ssim: floors on the mean over the calibration samples (dB; SSIM in [-1, 1]).
    max_seconds:    at most these seconds of sampling per engine call (one engine batch).
    budget_seconds: the whole tune, first runs included.
    first_samples:  calibration samples a candidate runs on first (more where it matters).
    z / z_fail:     standard errors a final pass must spare / an early reject must miss by.
    retime_rounds:  interleaved rounds of re-timing the finalists with full compute.
    max_interval:   the largest N tried.
    """

    min_psnr: float | None = None
    min_ssim: float | None = None
    max_seconds: float | None = None
    budget_seconds: float = 180.0
    first_samples: int = 2
    z: float = 1.0
    z_fail: float = 2.0
    retime_rounds: int = 5
    max_interval: int = 12
    max_finalists: int = 12

    def __post_init__(self) -> None:
        if self.min_psnr is None and self.min_ssim is None and self.max_seconds is None:
            raise ConfigError("expected at least one of --min-psnr, --min-ssim, --max-seconds, got none")
        for name, low, high in (("min_psnr", -math.inf, PSNR_CAP), ("min_ssim", -1.0, 1.0),
                                ("max_seconds", 0.0, math.inf), ("budget_seconds", 0.0, math.inf)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not low <= v <= high or (name in ("max_seconds", "budget_seconds") and v <= 0)):
                raise ConfigError(f"{name} must be a finite number in [{low:g}, {high:g}]"
                                  f"{' above 0' if name in ('max_seconds', 'budget_seconds') else ''}, got {v!r}")
        for name in ("first_samples", "retime_rounds", "max_interval", "max_finalists"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "max_interval" else 1):
                raise ConfigError(f"{name} must be an integer >= {2 if name == 'max_interval' else 1}, got {v!r}")

    @property
    def objective(self) -> str:
        """``speed`` with a quality floor, ``psnr`` with a time limit alone."""
        return "speed" if self.min_psnr is not None or self.min_ssim is not None else "psnr"

    def floors(self) -> dict[str, float]:
        return {k: v for k, v in (("psnr", self.min_psnr), ("ssim", self.min_ssim)) if v is not None}


@dataclass
class Candidate:
    """One candidate setting and what was measured of it."""

    config: ClusCaConfig
    label: str
    predicted_seconds: float = math.nan  # per engine call (one chunk)
    predicted_speedup: float = math.nan
    psnr: list[float] = field(default_factory=list)  # per calibration sample, in sample order
    ssim: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per chunk, from its quality runs
    measured_speedup: float | None = None  # re-timed against full compute
    measured_seconds: float | None = None
    verdict: Verdict = Verdict.UNSURE
    scale: float = 1.0  # measured / predicted speed-up of the nearest re-timed finalist (1: none re-timed)

    @property
    def samples(self) -> int:
        return len(self.psnr)

    @property
    def mean_psnr(self) -> float:
        return float(np.mean(self.psnr)) if self.psnr else math.nan

    @property
    def mean_ssim(self) -> float | None:
        return float(np.mean(self.ssim)) if self.ssim else None

    @property
    def speedup(self) -> float:
        """The measured speed-up where re-timed, else the predicted one on the measured scale (times
        measured / predicted of the re-timed candidate nearest in predicted speed-up)."""
        return self.measured_speedup if self.measured_speedup is not None else self.predicted_speedup * self.scale

    def to_dict(self) -> dict:
        return {
            "label": self.label, "method": self.config.method.value,
            "config": {f.name: _plain(getattr(self.config, f.name)) for f in dataclasses.fields(self.config)},
            "samples": self.samples, "psnr": _num(self.mean_psnr), "ssim": _num(self.mean_ssim),
            "psnr_per_sample": [_num(v) for v in self.psnr], "ssim_per_sample": [_num(v) for v in self.ssim],
            "predicted_seconds": _num(self.predicted_seconds), "predicted_speedup": _num(self.predicted_speedup),
            "measured_seconds": _num(self.measured_seconds), "measured_speedup": _num(self.measured_speedup),
            "speedup": _num(self.speedup), "verdict": self.verdict.value,
        }


def _num(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(v)


@dataclass
class TuneResult:
    """What ``tune`` found. ``chosen`` is None where nothing met the request (``error`` says why)."""

    settings: TuneSettings
    chosen: Candidate | None
    front: list[Candidate]
    candidates: list[Candidate]
    full_seconds: float  # per engine call, full compute, predicted by the cost model
    full_measured_seconds: float | None
    calibration: dict
    machine: dict
    space: dict
    elapsed: float
    stopped_early: bool
    scored_on: str  # "images" or "latents"
    error: str | None = None
    runs: list = field(default_factory=list)  # every run: (seconds since the start, setting, samples, steps, seconds)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "tool": "clusca-trt tune",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request": {"min_psnr": self.settings.min_psnr, "min_ssim": self.settings.min_ssim,
                        "max_seconds": self.settings.max_seconds, "budget_seconds": self.settings.budget_seconds,
                        "objective": self.settings.objective},
            "settings": {k: _plain(v) for k, v in dataclasses.asdict(self.settings).items()},
            "calibration": self.calibration, "machine": self.machine, "scored_on": self.scored_on,
            "space": self.space, "elapsed_seconds": round(self.elapsed, 2), "stopped_early": self.stopped_early,
            "full_seconds_per_call": _num(self.full_seconds),
            "full_measured_seconds_per_call": _num(self.full_measured_seconds),
            "chosen": self.chosen.to_dict() if self.chosen else None, "error": self.error,
            "front": [c.to_dict() for c in self.front], "candidates": [c.to_dict() for c in self.candidates],
            "runs": [dict(zip(("at", "setting", "samples", "steps", "seconds"), r)) for r in self.runs],
        }


# ------------------------------------------------------------------------------------------
# calibration inputs and scores


def calibration_inputs(pipe, samples: int, given: dict, rng_seed: int = 0) -> dict:
    """The family inputs of the calibration set (``generate`` keywords, ``samples`` of them).

    DiT: ``class_labels`` as given (cycled to ``samples``), else 0, 1, ... mod the class count.
    FLUX / HunyuanVideo: ``prompt`` (a list) or the embeddings as given, cycled to ``samples``;
    else, for a build of random weights only, random embeddings of the build's shapes (a trained
    model needs real prompts: random embeddings would tune it for noise)."""
    fam = pipe.family
    sampling = pipe.model.get("sampling") or {}
    out = {k: v for k, v in given.items() if v is not None}
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"samples must be an integer >= 1, got {samples!r}")
    primary = fam.primary
    if primary.kind == "labels":
        labels = list(out.get(primary.name) or range(int(sampling["num_classes"])))
        out[primary.name] = [labels[i % len(labels)] for i in range(samples)]
        return out
    if out.get("prompt"):
        prompts = [out["prompt"]] if isinstance(out["prompt"], str) else list(out["prompt"])
        out["prompt"] = [prompts[i % len(prompts)] for i in range(samples)]
        return out
    arrays = [f.name for f in fam.inputs if f.kind == "array"]
    if any(name in out for name in arrays):
        first = np.asarray(out[arrays[0]])
        idx = np.arange(samples) % len(first)
        for name in arrays:
            if name in out:
                out[name] = np.asarray(out[name])[idx]
        return out
    if pipe.model.get("source", {}).get("kind") != "random-init":
        raise InputError(f"expected calibration prompts (--prompt, --prompts FILE) or embeddings (--embeddings FILE) "
                         f"for a {fam.name} build of trained weights, got none")
    rng = np.random.default_rng(rng_seed)
    n, length = samples, int(sampling["text_length"])
    out["prompt_embeds"] = rng.standard_normal((n, length, int(sampling["text_dim"])), np.float32)
    out["pooled_prompt_embeds"] = rng.standard_normal((n, int(sampling["pooled_dim"])), np.float32)
    if "prompt_attention_mask" in arrays:
        out["prompt_attention_mask"] = np.ones((n, length), np.float32)
    return out


def sample_slice(pipe, inputs: dict, start: int, stop: int) -> dict:
    """The inputs of calibration samples ``start..stop-1`` (per-sample inputs cut, the rest kept)."""
    per_sample = {f.name for f in pipe.family.inputs if f.kind in ("labels", "prompts", "array")}
    out = {}
    for k, v in inputs.items():
        out[k] = v[start:stop] if k in per_sample and v is not None and not isinstance(v, str) else v
    return out


def score_frames(result) -> tuple[np.ndarray, str]:
    """A run's output as frames ``[n, frames, H, W, C]``: the decoded images where the build has a
    decoder, else the latents (channels last)."""
    if result.images is not None:
        x = np.asarray(result.images, np.float32)
        return (x[:, None] if x.ndim == 4 else x), "images"
    x = np.asarray(result.latents, np.float32)
    if x.ndim == 4:  # [n, C, H, W]
        return x.transpose(0, 2, 3, 1)[:, None], "latents"
    if x.ndim == 5:  # [n, C, F, H, W]
        return x.transpose(0, 2, 3, 4, 1), "latents"
    if x.ndim == 3:  # [n, tokens, C]
        return x[:, None, :, None, :], "latents"
    raise InputError(f"expected outputs of 3 to 5 dimensions, got {list(x.shape)}")


def sample_scores(frames: np.ndarray, reference: np.ndarray, data_range: float,
                  with_ssim: bool) -> tuple[list[float], list[float]]:
    """Per sample: PSNR (dB, capped at ``PSNR_CAP``) over all its frames, and the mean SSIM of its
    frames (empty where not asked or the frames are under 11 x 11)."""
    from ..runtime.metrics import psnr_each, ssim_each

    n = len(frames)
    flat = lambda x: x.reshape(n, -1, 1, 1)  # noqa: E731
    p = np.minimum(psnr_each(flat(frames), flat(reference), data_range), PSNR_CAP)
    s: list[float] = []
    if with_ssim:
        f = frames.shape[1]
        each = ssim_each(frames.reshape(n * f, *frames.shape[2:]), reference.reshape(n * f, *reference.shape[2:]),
                         data_range)
        s = [float(v) for v in each.reshape(n, f).mean(axis=1)]
    return [float(v) for v in p], s


# ------------------------------------------------------------------------------------------
# the search


class _Budget:
    def __init__(self, seconds: float, clock=time.perf_counter):
        self.clock, self.start, self.seconds = clock, clock(), seconds

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed


class Tuner:
    """One tune of one loaded ``Pipeline`` (see the module docstring); ``run()`` -> ``TuneResult``."""

    def __init__(self, pipe, settings: TuneSettings, inputs: dict, seed: int = 0, steps: int | None = None,
                 progress: Callable[[float, str], None] | None = None, clock=time.perf_counter):
        self.pipe, self.settings, self.seed = pipe, settings, seed
        self.budget = _Budget(settings.budget_seconds, clock)
        self.progress = progress or (lambda fraction, status: None)
        self.inputs = dict(inputs)
        self.steps = int(steps or self.inputs.pop("steps", None) or pipe.family.steps(pipe.model.get("sampling") or {}))
        self.inputs.pop("steps", None)
        self.inputs.pop("seed", None)
        self.inputs.pop("keys", None)
        first = self.inputs.get(pipe.family.primary.name)
        if first is None:
            first = self.inputs.get("prompt_embeds")
        if first is None or len(first) < 1:
            raise InputError(f"expected calibration inputs ({pipe.family.primary.name} or prompt_embeds), got none; "
                             f"see calibration_inputs")
        self.n = len(first)
        self.batch = pipe.spec.options.batch
        self.chunks = math.ceil(self.n / self.batch)
        spec = pipe.spec
        self.built_k = spec.options.clusters if spec.clustered_groups else 0
        self.built_order = spec.options.order
        self.build = Build(self.built_k, self.built_order, self.steps, pipe.defaults, settings.max_interval)
        self.full = pipe.resolve_config("full")
        self.model = CostModel(spec, self.built_order, self.steps)
        self.floors = settings.floors()
        self.with_ssim = "ssim" in self.floors
        self.sd_prior = {"psnr": 2.0, "ssim": 0.01}
        self.candidates: dict[ClusCaConfig, Candidate] = {}
        self.reference: np.ndarray | None = None
        self.data_range = 1.0
        self.scored_on = "images"
        self.stopped_early = False
        self.full_measured: float | None = None
        self._searching = False  # while searching, the end's reserve is not spent
        self._full_timed_at = 0.0
        self.log: list[tuple] = []  # every run: (seconds since the start, setting, samples, steps, seconds)
        self._default_keys: set = set()

    # -- runs -----------------------------------------------------------------------------
    def _run(self, config: ClusCaConfig, start: int, stop: int, steps: int | None = None, observe: bool = True):
        kwargs = sample_slice(self.pipe, self.inputs, start, stop)
        keys = [(self.seed, j) for j in range(start, stop)]
        res = self.pipe.generate(**kwargs, seed=self.seed, steps=steps or self.steps, keys=keys, config=config)
        if observe:
            self.model.observe(config, res.seconds, res.timings, math.ceil((stop - start) / self.batch), steps)
        self.log.append((round(self.budget.elapsed, 3), label(config), stop - start, steps or self.steps,
                         round(res.seconds, 4)))
        return res

    def _status(self, text: str) -> None:
        self.progress(min(1.0, self.budget.elapsed / self.settings.budget_seconds), text)

    def _warm_up(self) -> None:
        """Full compute on one engine batch and a short schedule, twice (the first calls allocate):
        the estimate of full compute on the calibration set, refused at once where the budget cannot
        pay it; then every method's graphs once (N = 2 on 4 steps runs each graph: plain, full,
        cluster, select, partial, forecast), timed: the cost model's first figures."""
        short = min(self.steps, 4)
        one = min(self.batch, self.n)
        self._run(self.full, 0, one, steps=short, observe=False)
        per_step = self._run(self.full, 0, one, steps=short).seconds / short
        estimate = per_step * self.steps * self.chunks
        if estimate > self.budget.left:
            s = self.settings
            raise TuneError(
                f"--budget-minutes {s.budget_seconds / 60:g} is too small to run full compute once on the calibration "
                f"set: expected about {estimate / 60:.2f} min for {self.n} samples x {self.steps} steps, got "
                f"{max(self.budget.left, 0) / 60:.2f} min left; raise --budget-minutes or lower --samples")
        for method in SEARCHED:
            try:
                config = self.pipe.resolve_config(method, interval=2)
            except ClusCaError:
                continue
            self._run(config, 0, one, steps=short)

    def _reference(self) -> None:
        res = self._run(self.full, 0, self.n, observe=False)  # its time: by _keep_full_timed, as the others
        frames, self.scored_on = score_frames(res)
        self.reference = frames
        if self.scored_on == "latents":
            self.data_range = float(frames.max() - frames.min()) or 1.0
        if self.with_ssim and (frames.shape[2] < 11 or frames.shape[3] < 11):
            raise InputError(f"--min-ssim needs outputs of at least 11 x 11, got {frames.shape[2]} x {frames.shape[3]} "
                             f"{self.scored_on}; use --min-psnr")

    def _candidate(self, config: ClusCaConfig) -> Candidate:
        c = self.candidates.get(config)
        if c is None:
            c = self.candidates[config] = Candidate(config, label(config))
        return c

    def _refresh(self, c: Candidate) -> None:
        c.predicted_seconds = self.model.seconds(c.config)
        c.predicted_speedup = self.model.speedup(c.config, self.full)

    def _cost(self, config: ClusCaConfig, samples: int) -> float:
        return self.model.seconds(config) * math.ceil(samples / self.batch)

    def _extend(self, c: Candidate, samples: int) -> bool:
        """Run ``c`` on calibration samples up to ``samples``; False where the budget cannot pay."""
        have = c.samples
        if samples <= have:
            return True
        if self._cost(c.config, samples - have) > self.budget.left - (self._reserve() if self._searching else 0.0):
            self.stopped_early = True
            return False
        res = self._run(c.config, have, samples)
        frames, _ = score_frames(res)
        p, s = sample_scores(frames, self.reference[have:samples], self.data_range, self.with_ssim)
        c.psnr += p
        c.ssim += s
        c.seconds.append(res.seconds / math.ceil((samples - have) / self.batch))
        self._refresh(c)
        self._update_prior()
        return True

    def _update_prior(self) -> None:
        for metric in self.floors:
            sds = [statistics.stdev(getattr(c, metric)) for c in self.candidates.values()
                   if len(getattr(c, metric)) >= 4]
            if sds:
                self.sd_prior[metric] = max(statistics.median(sds), 1e-6)

    def _judge(self, c: Candidate) -> Verdict:
        final = c.samples >= self.n
        vs = [verdict(getattr(c, m), floor, final, self.sd_prior[m], self.settings.z, self.settings.z_fail)
              for m, floor in self.floors.items()]
        return combine(vs)

    def evaluate(self, config: ClusCaConfig, upto: int | None = None) -> Verdict:
        """Run ``config`` on as many samples as its verdict needs (see ``verdict``), at most ``upto``."""
        c = self._candidate(config)
        while True:
            v = self._judge(c)
            if v is not Verdict.UNSURE or (upto is not None and c.samples >= upto):
                c.verdict = v
                return v
            if not self._extend(c, next_samples(c.samples, self.n, self.batch, self.settings.first_samples)):
                c.verdict = Verdict.UNSURE
                return Verdict.UNSURE
            self._status(f"{len(self.candidates)} tried; {c.label}: {c.mean_psnr:.2f} dB on {c.samples}")

    # -- the search -------------------------------------------------------------------------
    def _time_bound(self) -> float:
        """The speed-up a candidate needs to fit ``max_seconds`` (1.0 without it)."""
        if self.settings.max_seconds is None:
            return 1.0
        return max(1.0, self.model.seconds(self.full) / self.settings.max_seconds)

    def _bound(self) -> float:
        """The predicted speed-up to beat: the best candidate that passed so far (by the current cost
        model), at least what ``max_seconds`` needs and at least full compute's 1.0."""
        passed = [self.model.speedup(c.config, self.full) for c in self.candidates.values()
                  if c.verdict is Verdict.PASS]
        return max([self._time_bound(), *passed])

    def _anchors(self, lines: list[Line]) -> bool:
        """The slowest (best) point of each method's default line, on the first samples: the high end
        of the front, and the floor's reachability. False where every one misses it clearly."""
        anchors = [ln.configs[0] for ln in lines if ln.key in self._default_keys]
        verdicts = []
        for config in anchors:
            verdicts.append(self.evaluate(config, upto=self.settings.first_samples))
        return not anchors or any(v is not Verdict.FAIL for v in verdicts)

    def _search_speed(self, lines: list[Line]) -> dict:
        configs = [c for ln in lines for c in ln.configs]
        out = {"lines": len(lines)}
        if not self._anchors(lines):
            out["unreachable"] = True  # every method's best default point misses the floor clearly
            return out
        while True:
            self._keep_full_timed()
            decided = {c for c, cand in self.candidates.items() if cand.verdict is not Verdict.UNSURE}
            speeds = {c: self.model.speedup(c, self.full) for c in configs}
            config = next_candidate(speeds, self._bound(), decided)
            if config is None:
                break
            if self.evaluate(config) is Verdict.UNSURE:  # out of budget
                break
            if self.budget.left <= self._reserve():
                self.stopped_early = True
                break
        out["pruned"] = len(configs) - len(self.candidates)
        self._enrich()
        return out

    def _enrich(self) -> None:
        """Two points above the chosen one on its line (smaller N, on the first samples): the front
        between the floor and the anchors."""
        best = [c for c in self.candidates.values() if c.verdict is Verdict.PASS]
        if not best:
            return
        top = max(best, key=lambda c: self.model.speedup(c.config, self.full)).config
        for n in (top.interval - 1, top.interval - 2):
            config = top.replace(interval=n)
            if n >= 2 and caches_something(config, self.steps, self.built_order) and config not in self.candidates:
                if self.budget.left - self._reserve() < self._cost(config, self.settings.first_samples):
                    return
                self.evaluate(config, upto=self.settings.first_samples)

    def _keep_full_timed(self) -> None:
        """Full compute on one engine batch again when its last timing is old (a tenth of the budget):
        on a machine whose load changes, the costs of every graph kind then span the same time."""
        interval = 0.1 * self.settings.budget_seconds
        if self.budget.elapsed - self._full_timed_at < interval:
            return
        if self.model.runs:
            cost = self.model.seconds(self.full)
            if cost > 0.5 * interval or cost > self.budget.left - self._reserve():
                return
        self._run(self.full, 0, min(self.batch, self.n))
        self._full_timed_at = self.budget.elapsed

    def _search_quality(self, lines: list[Line]) -> dict:
        limit = self.settings.max_seconds
        picks = []
        for line in lines:
            n = best_within({c.interval: self.model.seconds(c) for c in line.configs}, limit)
            if n is not None:
                picks.append(line.at(n))
        if not picks:
            fastest = min((c for ln in lines for c in ln.configs), key=self.model.seconds)
            raise TuneError(f"no setting runs within {limit:g} s per engine call on this machine: the fastest, "
                            f"{label(fastest)}, takes about {self.model.seconds(fastest):.3g} s; raise --max-seconds")
        first = self.settings.first_samples
        for config in sorted(picks, key=self.model.seconds):
            if self.budget.left <= self._reserve() or not self._extend(self._candidate(config), first):
                self.stopped_early = True
                break
        # more samples for those that may be the best: within two standard errors of the leader
        while self.budget.left > self._reserve():
            tried = [self.candidates[c] for c in picks if c in self.candidates]
            lead = max(tried, key=lambda c: c.mean_psnr)
            se = lambda c: standard_error(c.psnr, self.sd_prior["psnr"])  # noqa: E731
            close = [c for c in tried
                     if c.samples < self.n and c.mean_psnr + 2 * se(c) >= lead.mean_psnr - 2 * se(lead)]
            if not close:
                break
            c = max(close, key=lambda c: c.mean_psnr)
            if not self._extend(c, next_samples(c.samples, self.n, self.batch, first)):
                break
        for c in self.candidates.values():
            c.verdict = Verdict.PASS if c.samples >= self.n else Verdict.UNSURE
        return {"lines": len(lines), "lines_searched": len(picks), "lines_pruned": len(lines) - len(picks)}

    def _reserve(self) -> float:
        """Budget kept for the end: re-timing the finalists and completing the front."""
        full = self.model.seconds(self.full) if self.model.runs else 0.0
        return min(0.25 * self.settings.budget_seconds, self.settings.retime_rounds * 4 * full)

    # -- the end: the front, re-timed ------------------------------------------------------
    def _points(self, cands: list[Candidate]) -> list[tuple[float, float]]:
        return [(c.speedup, c.mean_psnr) for c in cands]

    def _front(self) -> list[Candidate]:
        cands = [c for c in self.candidates.values() if c.samples]
        return [cands[i] for i in pareto_front(self._points(cands))]

    def _complete_front(self) -> None:
        """Every front member on the whole calibration set (budget permitting), until the front holds."""
        for _ in range(10):
            short = [c for c in self._front() if c.samples < self.n and c.verdict is not Verdict.FAIL]
            if not short:
                return
            for c in short:
                if not self._extend(c, self.n):
                    return
                c.verdict = self._judge(c) if self.floors else Verdict.PASS
                if c.verdict is Verdict.UNSURE:
                    c.verdict = Verdict.FAIL if self.floors else Verdict.PASS

    def _retime(self, finalists: list[Candidate]) -> None:
        """Interleaved rounds over full compute and ``finalists`` on one engine batch; a finalist's
        speed-up is the median over rounds of full's time over its own (``bench``'s convention)."""
        rows = [None] + finalists
        per_round = self.model.seconds(self.full) + sum(c.predicted_seconds for c in finalists)
        times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
        for r in range(self.settings.retime_rounds):
            if per_round > self.budget.left:
                self.stopped_early = True
                break
            order = list(range(len(rows)))
            order = order[r % len(order):] + order[: r % len(order)]
            for i in order:
                config = self.full if rows[i] is None else rows[i].config
                times[i].append(self._run(config, 0, min(self.batch, self.n)).seconds)
            self._status(f"re-timing the front: round {r + 1}/{self.settings.retime_rounds}")
        if not times[0]:
            return
        self.full_measured = statistics.median(times[0])
        for i, c in enumerate(finalists, start=1):
            ratios = [f / t for f, t in zip(times[0], times[i]) if t > 0]
            if ratios:
                c.measured_speedup = statistics.median(ratios)
                c.measured_seconds = statistics.median(times[i])
        # the others' predictions on the measured scale: times measured / predicted of the re-timed
        # candidate nearest in predicted speed-up (the same schedule cost: the same speed-up)
        timed = [c for c in finalists if c.measured_speedup is not None and c.predicted_speedup > 0]
        for c in self.candidates.values():
            if c.measured_speedup is None and timed and c.predicted_speedup > 0:
                near = min(timed, key=lambda t: abs(math.log(t.predicted_speedup / c.predicted_speedup)))
                c.scale = near.measured_speedup / near.predicted_speedup

    def _finalists(self) -> list[Candidate]:
        front = self._front()
        passing = sorted((c for c in self.candidates.values() if c.verdict is Verdict.PASS),
                         key=lambda c: -(c.predicted_speedup if self.settings.objective == "speed" else c.mean_psnr))
        out = []
        for c in [*passing[:3], *front]:
            if c not in out:
                out.append(c)
        return out[: self.settings.max_finalists]

    def _choose(self) -> Candidate | None:
        ok = [c for c in self.candidates.values() if c.verdict is Verdict.PASS]
        if self.settings.max_seconds is not None:  # by the cost model: medians over every call, the steadier
            ok = [c for c in ok if c.predicted_seconds <= self.settings.max_seconds]
        if not ok:
            return None
        if self.settings.objective == "speed":
            return max(ok, key=lambda c: (c.speedup, c.mean_psnr))
        return max(ok, key=lambda c: (c.mean_psnr, c.speedup))

    # -- the whole tune ---------------------------------------------------------------------
    def run(self) -> TuneResult:
        s = self.settings
        self._status("warming up")
        self._warm_up()
        self._status(f"full compute on {self.n} calibration samples")
        self._reference()
        self._full_timed_at = -math.inf
        self._keep_full_timed()
        self._default_keys = {line_key(c) for c in self._default_configs()}
        lines = candidate_space(self.build)
        if not lines:
            raise TuneError(f"expected candidate settings for {self.steps} steps on these engines, got none "
                            f"(every schedule would be full compute)")
        space = {"candidates": sum(len(ln.configs) for ln in lines),
                 "by_method": {m: sum(len(ln.configs) for ln in lines if ln.method == m) for m in SEARCHED}}
        self._searching = True
        try:
            space.update(self._search_speed(lines) if s.objective == "speed" else self._search_quality(lines))
        finally:
            self._searching = False
        for c in self.candidates.values():
            self._refresh(c)  # the cost model saw more runs since
        self._complete_front()
        if self.candidates:
            self._retime(self._finalists())
        chosen = self._choose()
        cands = sorted(self.candidates.values(), key=lambda c: -c.speedup)
        result = TuneResult(
            settings=s, chosen=chosen, front=self._front(), candidates=cands,
            full_seconds=self.model.seconds(self.full), full_measured_seconds=self.full_measured,
            calibration={"samples": self.n, "seed": self.seed, "steps": self.steps, "batch": self.batch,
                         "inputs": _describe_inputs(self.inputs)},
            machine=_machine(self.pipe), space=space, elapsed=self.budget.elapsed,
            stopped_early=self.stopped_early, scored_on=self.scored_on, runs=list(self.log),
        )
        if chosen is None:
            result.error = self._failure(cands)
        self.progress(1.0, "done")
        return result

    def _default_configs(self) -> list[ClusCaConfig]:
        out = []
        for method in SEARCHED:
            try:
                c = self.pipe.resolve_config(method)
            except ClusCaError:
                continue
            if method == "taylorseer":
                c = c.replace(order=self.built_order)
            out.append(c)
        return out

    def _failure(self, cands: list[Candidate]) -> str:
        s = self.settings
        tried = [c for c in cands if c.samples]
        if not tried:
            return (f"the budget ran out before any candidate was scored ({self.budget.elapsed / 60:.1f} min, "
                    f"full compute included); raise --budget-minutes or lower --samples")
        best = max(tried, key=lambda c: c.mean_psnr)
        floors = ", ".join(f"{k.upper()} >= {v:g}{' dB' if k == 'psnr' else ''}" for k, v in self.floors.items())
        if s.max_seconds is not None:
            floors = ", ".join(filter(None, [floors, f"<= {s.max_seconds:g} s per engine call"]))
        extra = " (the budget ran out first: raise --budget-minutes)" if self.stopped_early else ""
        best_ssim = f", SSIM {best.mean_ssim:.4f}" if best.mean_ssim is not None else ""
        return (f"no setting of these engines meets {floors} on the calibration set{extra}: the best PSNR found is "
                f"{best.mean_psnr:.2f} dB{best_ssim} ({best.label}, {best.samples} samples); lower the floor")


def _describe_inputs(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, np.ndarray):
            out[k] = f"array {list(v.shape)}"
        elif isinstance(v, (list, tuple)):
            out[k] = list(v) if len(v) <= 64 and all(isinstance(x, (int, str)) for x in v) else f"{len(v)} items"
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def _machine(pipe) -> dict:
    from .bench import device_name

    info = pipe.engine.info
    return {"device": device_name(info), "backend": pipe.engine.backend, "provider": pipe.engine.provider,
            "precision": pipe.engine.precision, "engine": str(info)}


def tune(pipe, settings: TuneSettings, inputs: dict, seed: int = 0, steps: int | None = None,
         progress: Callable[[float, str], None] | None = None) -> TuneResult:
    """Tune ``pipe``'s build on the calibration ``inputs`` (``calibration_inputs``); see the module docstring."""
    return Tuner(pipe, settings, inputs, seed=seed, steps=steps, progress=progress).run()


# ------------------------------------------------------------------------------------------
# output


def format_front(result: TuneResult) -> str:
    """The Pareto front (speed-up vs PSNR) as a table, the chosen row marked ``*``."""
    s = result.settings
    head = ["", "setting", "PSNR dB", "SSIM", "samples", "speed-up (pred.)", "speed-up (measured)", "floor"]
    rows = []
    for c in result.front:
        rows.append(["*" if c is result.chosen else "", c.label, f"{c.mean_psnr:.2f}",
                     "-" if c.mean_ssim is None else f"{c.mean_ssim:.4f}", str(c.samples),
                     f"{c.predicted_speedup:.2f}x",
                     "-" if c.measured_speedup is None else f"{c.measured_speedup:.2f}x",
                     {"pass": "pass", "fail": "fail", "unsure": "?"}[c.verdict.value]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    floors = ", ".join(filter(None, [f"PSNR >= {s.min_psnr:g} dB" if s.min_psnr is not None else "",
                                     f"SSIM >= {s.min_ssim:g}" if s.min_ssim is not None else "",
                                     f"<= {s.max_seconds:g} s per engine call" if s.max_seconds is not None else ""]))
    cal = result.calibration
    lines = [f"Pareto front of speed-up vs PSNR ({len(result.front)} of {len(result.candidates)} candidates tried; "
             f"{result.space.get('candidates', 0)} in the space) for {floors}; scored on {result.scored_on} of "
             f"{cal['samples']} calibration samples (seed {cal['seed']}, {cal['steps']} steps) vs full compute; "
             f"{result.machine['device']}, {result.machine['engine']}; {result.elapsed / 60:.1f} min"
             + (" (budget reached)" if result.stopped_early else ""),
             fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
    if result.chosen is not None:
        c = result.chosen
        lines.append(f"chosen: {c.label}: PSNR {c.mean_psnr:.2f} dB on {c.samples} samples, "
                     f"{c.speedup:.2f}x vs full ({'measured' if c.measured_speedup is not None else 'predicted'})")
    return "\n".join(lines)


def write_json(result: TuneResult, path: Path) -> None:
    import json

    text = json.dumps(result.to_dict(), indent=2, sort_keys=True)
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def plot_front(result: TuneResult, path: Path) -> None:
    """Speed-up vs PSNR of every candidate tried (grey), the front (a line), the chosen one (a star)
    and the floor; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib, got none; pip install 'clusca-trt[bench]'") from None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"clusca": "o", "taylorseer": "s", "fora": "^"}
    for method, marker in markers.items():
        pts = [c for c in result.candidates if c.config.method.value == method and c.samples]
        if pts:
            ax.scatter([c.speedup for c in pts], [c.mean_psnr for c in pts], marker=marker, s=18, alpha=0.45,
                       label=f"{method} (tried)")
    front = sorted(result.front, key=lambda c: c.speedup)
    ax.plot([c.speedup for c in front], [c.mean_psnr for c in front], "k-", lw=1.2, label="Pareto front")
    if result.chosen is not None:
        ax.plot([result.chosen.speedup], [result.chosen.mean_psnr], "r*", ms=14, label=f"chosen: {result.chosen.label}")
    if result.settings.min_psnr is not None:
        ax.axhline(result.settings.min_psnr, color="tab:red", ls=":", label=f"floor {result.settings.min_psnr:g} dB")
    ax.set_xlabel("speed-up vs full compute (measured where re-timed, else predicted)")
    ax.set_ylabel(f"PSNR vs full compute (dB, {result.scored_on})")
    ax.set_title(f"clusca-trt tune: {result.calibration['samples']} samples, {result.calibration['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def source_record(result: TuneResult) -> dict:
    """What ``write_defaults`` records as ``defaults_source``: the request, what the chosen setting
    scored and where it was measured."""
    c = result.chosen
    s = result.settings
    return {
        "tool": "tune", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "min_psnr": s.min_psnr, "min_ssim": s.min_ssim, "max_seconds": s.max_seconds,
        "psnr": _num(c.mean_psnr), "ssim": _num(c.mean_ssim), "speedup": _num(c.speedup),
        "speedup_measured": c.measured_speedup is not None, "label": c.label,
        "samples": result.calibration["samples"], "seed": result.calibration["seed"],
        "steps": result.calibration["steps"], "scored_on": result.scored_on,
        "backend": result.machine["backend"], "provider": result.machine["provider"],
        "precision": result.machine["precision"], "device": result.machine["device"],
    }
