"""clusca-trt tune: the pure decisions by table (dominance, the front, the verdict on a floor, the
next candidate, sample counts, the candidate space, the cost model), then real tunes of a tiny
random-weight DiT on ONNX Runtime (the front is non-dominated; the chosen one meets the floor)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clusca_trt.analysis import tune as T
from clusca_trt.analysis.tune import Verdict
from clusca_trt.config import ClusCaConfig
from clusca_trt.errors import ConfigError, InputError

DEFAULTS = ClusCaConfig(interval=5, clusters=16, propagation=0.005, order=2, warmup=2)


# -- dominance and the front -------------------------------------------------------------------


@pytest.mark.parametrize("a, b, want", [
    ((2.0, 40.0), (1.5, 39.0), True),   # faster and better
    ((2.0, 40.0), (2.0, 39.0), True),   # as fast, better
    ((2.0, 40.0), (1.5, 40.0), True),   # faster, as good
    ((2.0, 40.0), (2.0, 40.0), False),  # equal: neither dominates
    ((2.0, 38.0), (1.5, 40.0), False),  # a trade-off
    ((1.5, 40.0), (2.0, 38.0), False),
])
def test_dominates(a, b, want):
    assert T.dominates(a, b) is want


@pytest.mark.parametrize("points, want", [
    ([], []),
    ([(1.0, 30.0)], [0]),
    ([(3.0, 30.0), (2.0, 40.0), (1.0, 50.0)], [0, 1, 2]),      # a clean trade-off, fastest first
    ([(1.0, 50.0), (3.0, 30.0), (2.0, 29.0)], [1, 0]),         # (2, 29) is dominated by (3, 30)
    ([(2.0, 40.0), (2.0, 40.0), (1.0, 39.0)], [0, 1]),         # equal points both stay
    ([(2.0, 40.0), (2.0, 41.0)], [1]),                          # as fast, better
])
def test_pareto_front(points, want):
    assert T.pareto_front(points) == want


def test_pareto_front_is_non_dominated_on_random_points():
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.random((200, 2))]
    front = T.pareto_front(pts)
    assert front
    for i in front:
        assert not any(T.dominates(q, pts[i]) for q in pts)
    for j in set(range(len(pts))) - set(front):
        assert any(T.dominates(pts[i], pts[j]) for i in front)


# -- the verdict on a floor ------------------------------------------------------------------


@pytest.mark.parametrize("values, floor, final, sd_prior, want", [
    ([], 38.0, False, 1.0, Verdict.UNSURE),
    ([30.0, 31.0], 38.0, False, 1.0, Verdict.FAIL),        # mean 30.5 + 2 * 1/sqrt(2) < 38
    ([37.0, 38.0], 38.0, False, 1.0, Verdict.UNSURE),      # within two standard errors: more samples
    ([45.0, 46.0], 38.0, False, 1.0, Verdict.UNSURE),      # clearly above: a pass needs the whole set
    ([40.0] * 16, 38.0, True, 2.0, Verdict.PASS),          # 40 - 1 * 2/4 >= 38
    ([38.2] * 16, 38.0, True, 2.0, Verdict.FAIL),          # 38.2 - 0.5 < 38: no standard error to spare
    ([38.6] * 16, 38.0, True, 2.0, Verdict.PASS),
    ([32.0, 48.0] * 8, 38.0, True, 0.1, Verdict.FAIL),     # mean 40, sd 8.26: se 2.07, 40 - 2.07 < 38
    ([38.0, 42.0] * 8, 38.0, True, 0.1, Verdict.PASS),     # mean 40, sd 2.07: se 0.52
])
def test_verdict(values, floor, final, sd_prior, want):
    assert T.verdict(values, floor, final, sd_prior) is want


def test_standard_error_takes_the_larger_of_spread_and_prior():
    assert T.standard_error([38.0, 42.0] * 8, 0.1) == pytest.approx(np.std([38.0, 42.0] * 8, ddof=1) / 4)
    assert T.standard_error([40.0] * 4, 2.0) == pytest.approx(1.0)


def test_verdict_margins_are_parameters():
    vals = [39.0] * 4
    assert T.verdict(vals, 38.0, True, 2.0, z=0.0) is Verdict.PASS
    assert T.verdict(vals, 38.0, True, 2.0, z=1.5) is Verdict.FAIL  # 39 - 1.5 < 38
    assert T.verdict([36.0] * 4, 38.0, False, 2.0, z_fail=0.5) is Verdict.FAIL  # 36 + 0.5 < 38
    assert T.verdict([36.0] * 4, 38.0, False, 2.0, z_fail=2.5) is Verdict.UNSURE  # 36 + 2.5 >= 38


@pytest.mark.parametrize("verdicts, want", [
    ([], Verdict.UNSURE),
    ([Verdict.PASS], Verdict.PASS),
    ([Verdict.PASS, Verdict.PASS], Verdict.PASS),
    ([Verdict.PASS, Verdict.UNSURE], Verdict.UNSURE),
    ([Verdict.UNSURE, Verdict.FAIL], Verdict.FAIL),
    ([Verdict.PASS, Verdict.FAIL], Verdict.FAIL),
])
def test_combine(verdicts, want):
    assert T.combine(verdicts) is want


# -- what runs next ----------------------------------------------------------------------------


@pytest.mark.parametrize("speeds, bound, decided, want", [
    ({"a": 3.0, "b": 2.0, "c": 1.5}, 1.0, set(), "a"),       # the fastest first
    ({"a": 3.0, "b": 2.0, "c": 1.5}, 1.0, {"a"}, "b"),       # then the next
    ({"a": 3.0, "b": 2.0, "c": 1.5}, 2.0, {"a"}, None),      # nothing left beats the bound (b passed)
    ({"a": 3.0, "b": 2.0, "c": 1.5}, 1.6, set(), "a"),
    ({"a": 0.9, "b": 0.8}, 1.0, set(), None),                # slower than full compute: never run
    ({}, 1.0, set(), None),
])
def test_next_candidate(speeds, bound, decided, want):
    assert T.next_candidate(speeds, bound, decided) == want


@pytest.mark.parametrize("times, limit, want", [
    ({2: 1.0, 3: 0.8, 4: 0.6}, 0.9, 3),
    ({2: 1.0, 3: 0.8, 4: 0.6}, 1.0, 2),
    ({2: 1.0, 3: 0.8, 4: 0.6}, 0.5, None),
])
def test_best_within(times, limit, want):
    assert T.best_within(times, limit) == want


@pytest.mark.parametrize("have, total, batch, first, want", [
    (0, 16, 1, 2, 2),
    (2, 16, 1, 2, 4),
    (4, 16, 1, 2, 8),
    (8, 16, 1, 2, 16),
    (0, 16, 4, 2, 4),    # at least one engine batch
    (4, 16, 4, 2, 8),
    (8, 10, 4, 2, 10),   # never more than the set
    (0, 3, 1, 4, 3),
    (0, 16, 3, 2, 3),
    (3, 16, 3, 2, 6),
])
def test_next_samples(have, total, batch, first, want):
    assert T.next_samples(have, total, batch, first) == want


# -- the candidate space -----------------------------------------------------------------------


def _space(**kw):
    build = T.Build(**{"clusters": 4, "order": 2, "steps": 50, "defaults": DEFAULTS, "max_interval": 6, **kw})
    return build, T.candidate_space(build)


def test_candidate_space_by_method():
    build, lines = _space()
    by = {m: [c for ln in lines if ln.method == m for c in ln.configs] for m in T.SEARCHED}
    n_intervals = len(range(2, 7))
    assert len(by["fora"]) == n_intervals * 3  # x warm-up 1, 2, 3
    assert len(by["taylorseer"]) == n_intervals * 3 * 2  # x orders 1, 2
    # x orders 0..2, gamma 0/0.005/0.02, fresh, update rules (correction: 1, the defaults' own)
    assert len(by["clusca"]) == n_intervals * 3 * 3 * 3 * 2 * 3
    assert all(c.clusters == 4 for c in by["clusca"]) and all(c.clusters == 0 for c in by["taylorseer"])
    assert all(c.order == 0 and c.clusters == 0 for c in by["fora"])
    for ln in lines:  # a line: one setting but N, N ascending
        assert list(ln.intervals) == sorted(ln.intervals)
        assert len({T.line_key(c) for c in ln.configs}) == 1
        assert all(c.method.value == ln.method for c in ln.configs)
    every = [c for ln in lines for c in ln.configs]
    assert len(set(every)) == len(every)


@pytest.mark.parametrize("kw, methods", [
    (dict(clusters=0), {"taylorseer", "fora"}),     # no clustered graphs: no ClusCa
    (dict(order=0), {"clusca", "fora"}),            # no Taylor order: no TaylorSeer, ClusCa O=0 only
])
def test_candidate_space_follows_the_build(kw, methods):
    build, lines = _space(**kw)
    assert {ln.method for ln in lines} == methods
    assert all(c.order <= build.order for ln in lines for c in ln.configs)


def test_candidate_space_drops_schedules_without_a_cached_step():
    build, lines = _space(steps=4)
    for ln in lines:
        for c in ln.configs:
            assert c.interval <= 3  # intervals 2..steps-1
            assert T.caches_something(c, 4, 2)
    assert not T.caches_something(ClusCaConfig(interval=3, clusters=0, order=1, warmup=3), 3, 2)


def test_a_dimension_is_one_row_and_unknown_fields_are_skipped():
    build = T.Build(clusters=4, order=2, steps=50, defaults=DEFAULTS, max_interval=4)
    dims = (
        T.Dimension("interval", T.SEARCHED, lambda b: (2, 3, 4)),
        T.Dimension("propagation", ("clusca",), (0.0, 0.5, 2.0)),  # 2.0: refused by ClusCaConfig, dropped
        T.Dimension("no_such_field", ("clusca",), ("x", "y")),    # a field another branch adds: inert here
    )
    lines = T.candidate_space(build, dims)
    clusca = [c for ln in lines if ln.method == "clusca" for c in ln.configs]
    assert sorted({c.propagation for c in clusca}) == [0.0, 0.5]
    assert len(clusca) == 3 * 2
    # every field the method does not search keeps the build's default
    assert all(c.warmup == DEFAULTS.warmup and c.order == DEFAULTS.order for c in clusca)


def test_label():
    assert T.label(ClusCaConfig(interval=6, clusters=0, order=2, warmup=1)) == "taylorseer N=6 O=2 W=1"
    assert T.label(ClusCaConfig(interval=4, clusters=0, order=0, warmup=2)) == "fora N=4 W=2"
    assert T.label(DEFAULTS) == "clusca N=5 O=2 W=2 K=16 g=0.005 fresh=random"
    assert T.label(ClusCaConfig(interval=1)) == "full"


# -- the cost model ----------------------------------------------------------------------------


def test_cost_model_predicts_from_per_call_medians(engines_k4):
    spec = engines_k4.spec
    model = T.CostModel(spec, 2, 20)
    cost = {"cond": 0.001, "plain": 0.010, "full": 0.012, "cluster_img": 0.004, "select_img": 0.0005,
            "partial": 0.003, "forecast": 0.001}
    host = 0.0002

    def run(config):
        counts = model.counts(config)
        calls = dict(zip(T.KINDS, counts[:-1]))
        timings = {g: [t] * int(calls[T.graph_kind(g)]) for g, t in cost.items() if calls[T.graph_kind(g)]}
        seconds = sum(sum(v) for v in timings.values()) + host * 20
        return seconds, timings

    full = ClusCaConfig(interval=1, clusters=0, order=2)
    ts = ClusCaConfig(interval=4, clusters=0, order=2, warmup=1)
    cc = ClusCaConfig(interval=4, clusters=4, order=2, warmup=1)
    for config in (full, ts):
        model.observe(config, *run(config), chunks=1)
    model.observe(cc, *run(cc), chunks=1)
    for config in (full, ts, cc):
        assert model.seconds(config) == pytest.approx(run(config)[0], rel=1e-9)
    assert model.speedup(ts, full) == pytest.approx(run(full)[0] / run(ts)[0], rel=1e-9)
    # a run of two chunks counts per chunk
    model2 = T.CostModel(spec, 2, 20)
    s, t = run(ts)
    model2.observe(ts, 2 * s, {g: v * 2 for g, v in t.items()}, chunks=2)
    assert model2.seconds(ts) == pytest.approx(s, rel=1e-9)


def test_cost_model_fits_runs_without_per_call_times(engines_k4):
    """A device loop reports no per-call times: per-kind costs fitted to the runs' seconds."""
    spec = engines_k4.spec
    model = T.CostModel(spec, 2, 20)
    true = np.array([0.001, 0.010, 0.012, 0.004, 0.0005, 0.003, 0.001, 0.0002])  # KINDS, then per step
    configs = [ClusCaConfig(interval=1, clusters=0, order=2)] + [
        ClusCaConfig(interval=n, clusters=k, order=o, warmup=w)
        for n in (2, 3, 5) for k in (0, 4) for o in (1, 2) for w in (1, 2)]
    for c in configs:
        model.observe(c, float(model.counts(c) @ true), {}, chunks=1)
    for c in configs:
        assert model.seconds(c) == pytest.approx(float(model.counts(c) @ true), rel=1e-6)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    ({}, "expected at least one of --min-psnr, --min-ssim, --max-seconds, got none"),
    (dict(min_psnr=float("nan")), "min_psnr must be a finite number"),
    (dict(min_ssim=1.5), "min_ssim must be a finite number in [-1, 1]"),
    (dict(min_psnr=30, max_seconds=0.0), "max_seconds must be a finite number"),
    (dict(min_psnr=30, budget_seconds=-1.0), "budget_seconds must be a finite number"),
    (dict(min_psnr=30, first_samples=0), "first_samples must be an integer >= 1, got 0"),
    (dict(min_psnr=30, max_interval=1), "max_interval must be an integer >= 2, got 1"),
])
def test_settings_are_checked(kw, message):
    with pytest.raises(ConfigError) as e:
        T.TuneSettings(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, objective", [
    (dict(min_psnr=30), "speed"), (dict(min_ssim=0.9), "speed"),
    (dict(min_psnr=30, max_seconds=1.0), "speed"), (dict(max_seconds=1.0), "psnr"),
])
def test_objective(kw, objective):
    assert T.TuneSettings(**kw).objective == objective


# -- real tunes on a tiny build ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(engines_k4):
    from clusca_trt.runtime.pipeline import Pipeline

    with Pipeline.load(engines_k4.directory, threads=1) as p:
        yield p


def _tune(pipe, samples=4, steps=12, **kw):
    settings = T.TuneSettings(**{"budget_seconds": 60.0, "max_interval": 6, **kw})
    inputs = T.calibration_inputs(pipe, samples, {})
    return T.tune(pipe, settings, inputs, seed=0, steps=steps)


@pytest.fixture(scope="module")
def result(pipe):
    """A tune whose floor some candidates miss (a random tiny model: PSNR of latents, 12 steps)."""
    return _tune(pipe, min_psnr=62.0)


def test_the_front_is_non_dominated_and_the_choice_meets_the_floor(result):
    assert result.candidates and result.front
    points = [(c.speedup, c.mean_psnr) for c in result.candidates if c.samples]
    for c in result.front:
        assert not any(T.dominates(p, (c.speedup, c.mean_psnr)) for p in points)
    for c in result.candidates:  # everything off the front is dominated by something on it
        if c.samples and c not in result.front:
            assert any(T.dominates((f.speedup, f.mean_psnr), (c.speedup, c.mean_psnr)) for f in result.front)
    c = result.chosen
    assert c is not None and c.verdict is Verdict.PASS and c.samples == 4
    assert c.mean_psnr - T.standard_error(c.psnr, 0.0) >= 62.0 - 1e-9
    passing = [x for x in result.candidates if x.verdict is Verdict.PASS]
    assert c.speedup == max(x.speedup for x in passing)
    assert any(x.verdict is Verdict.FAIL for x in result.candidates)  # the floor was binding
    assert result.scored_on == "latents"


def test_the_result_is_json_and_a_table(result, tmp_path):
    path = tmp_path / "t.json"
    T.write_json(result, path)
    data = json.loads(path.read_text())
    assert data["chosen"]["label"] == result.chosen.label and data["request"]["min_psnr"] == 62.0
    assert len(data["front"]) == len(result.front) and data["calibration"]["samples"] == 4
    assert ClusCaConfig(**data["chosen"]["config"]) == result.chosen.config
    text = T.format_front(result)
    assert "Pareto front" in text and f"chosen: {result.chosen.label}" in text
    assert text.count("\n") == 3 + len(result.front)


def test_the_chosen_scores_are_what_a_run_gives(pipe, result):
    """The per-sample scores are the PSNR of exactly that run against full compute, same seeds."""
    from clusca_trt.runtime.metrics import psnr_each

    labels = T.calibration_inputs(pipe, 4, {})["class_labels"]
    full = pipe.generate(labels, steps=12, seed=0, method="full")
    got = pipe.generate(labels, steps=12, seed=0, config=result.chosen.config)
    x = lambda r: r.latents.transpose(0, 2, 3, 1)  # noqa: E731
    rng = float(x(full).max() - x(full).min())
    want = np.minimum(psnr_each(x(got), x(full), rng), T.PSNR_CAP)
    np.testing.assert_allclose(result.chosen.psnr, want, rtol=1e-6)


def test_an_unreachable_floor_says_the_best_psnr_found(pipe):
    r = _tune(pipe, min_psnr=99.0)
    assert r.chosen is None
    best = max(c.mean_psnr for c in r.candidates if c.samples)
    assert f"the best PSNR found is {best:.2f} dB" in r.error and "\n" not in r.error


def test_a_time_limit_alone_maximises_psnr(pipe):
    full = _tune(pipe, min_psnr=0.0).full_seconds
    limit = 0.9 * full  # room for the second tune's timings to drift (other test workers share the cores)
    r = _tune(pipe, max_seconds=limit)
    assert r.chosen is not None and r.settings.objective == "psnr"
    fits = [c for c in r.candidates if c.verdict is Verdict.PASS and c.predicted_seconds <= limit]
    assert r.chosen.mean_psnr == max(c.mean_psnr for c in fits)


def test_a_budget_too_small_for_full_compute_is_one_line(pipe):
    with pytest.raises(T.TuneError) as e:
        _tune(pipe, min_psnr=30.0, budget_seconds=0.01)
    assert "too small to run full compute once" in str(e.value) and "\n" not in str(e.value)


def test_calibration_inputs(pipe):
    assert T.calibration_inputs(pipe, 3, {})["class_labels"] == [0, 1, 2]
    assert T.calibration_inputs(pipe, 5, {"class_labels": [7, 8]})["class_labels"] == [7, 8, 7, 8, 7]
    with pytest.raises(ConfigError):
        T.calibration_inputs(pipe, 0, {})


def test_an_ssim_floor_is_met_on_the_whole_set(pipe):
    r = _tune(pipe, min_ssim=0.9999)
    assert r.chosen is not None and r.chosen.samples == 4
    ssim = r.chosen.ssim
    assert len(ssim) == 4 and np.mean(ssim) - T.standard_error(ssim, 0.0) >= 0.9999 - 1e-12


# -- prompt families ---------------------------------------------------------------------------


def test_flux_tunes_on_embeddings_and_refuses_none_for_trained_weights(flux_engines):
    from clusca_trt.runtime.pipeline import Pipeline

    with Pipeline.load(flux_engines.directory, threads=1) as p:
        with pytest.raises(InputError, match="expected calibration prompts"):
            T.calibration_inputs(p, 2, {})  # weights from a folder: random embeddings would tune for noise
        s = p.model["sampling"]
        rng = np.random.default_rng(0)
        given = {"prompt_embeds": rng.standard_normal((1, s["text_length"], s["text_dim"]), np.float32),
                 "pooled_prompt_embeds": rng.standard_normal((1, s["pooled_dim"]), np.float32)}
        inputs = T.calibration_inputs(p, 2, given)  # one embedding, cycled to two samples
        assert inputs["prompt_embeds"].shape[0] == 2
        r = T.tune(p, T.TuneSettings(min_psnr=20.0, budget_seconds=60.0, max_interval=3), inputs, steps=4)
    assert r.chosen is not None and r.scored_on == "images" and r.chosen.samples == 2


def test_latent_psnr_is_one_psnr_over_the_arrays_with_the_reference_range_as_peak():
    from clusca_trt.runtime.metrics import latent_psnr

    ref = np.array([[0.0, 2.0], [1.0, 1.0]], np.float32)  # range 2
    assert latent_psnr(ref, ref) == float("inf")
    got = latent_psnr(ref + np.float32(0.1), ref)  # MSE 0.01: 10 log10(4 / 0.01)
    assert got == pytest.approx(10 * np.log10(400.0), rel=1e-6)
