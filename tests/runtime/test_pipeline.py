"""End to end: the ONNX Runtime engines against plain PyTorch DiT sampling and against the
PyTorch reference ClusCa (the same step modules run eagerly)."""

import numpy as np
import pytest
import torch

from clusca_trt.exporters.build import build_engines
from clusca_trt.errors import ConfigError, EngineMismatchError, InputError
from clusca_trt.models import load_model
from clusca_trt.runtime import dit as dit_runtime
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import BuildOptions
from tests.conftest import make_diffusers_dit

LABELS = [3, 1, 4]  # 3 samples: two chunks at batch 2 (one padded)
STEPS = 20


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def plain_sampling(forward, manifest, labels, seed, steps, sampler="ddim", cfg_scale=1.5):
    """DiT sampling with a plain model call every step (no caching, no engines)."""
    m = manifest.model["config"]

    def make(rng):
        def denoise(step, feeds):
            with torch.no_grad():
                x, t, y = (torch.from_numpy(feeds[k]) for k in ("x", "t", "y"))
                return forward(x, t, y).numpy()

        return denoise

    return dit_runtime.sample(
        make, manifest.spec.options.batch, (m["in_channels"], m["input_size"], m["input_size"]),
        labels, seed, steps, sampler, cfg_scale, m["num_classes"],
    )


@pytest.fixture(scope="module")
def pipes(tiny_model, engines_k4, engines_k16):
    out = {}
    for k, manifest in ((4, engines_k4), (16, engines_k16)):
        out[k] = (Pipeline.load(manifest.directory), Pipeline.from_adapter(tiny_model.adapter, manifest.spec))
    return out


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_interval_1_equals_plain_pytorch_sampling(tiny_model, engines_k4, pipes, sampler):
    engine, _ = pipes[4]
    got = engine.generate(LABELS, seed=0, method="full", steps=STEPS, sampler=sampler).latents
    want = plain_sampling(tiny_model.adapter.model, engines_k4, LABELS, 0, STEPS, sampler)
    assert got.shape == (3, 4, 16, 16)
    assert rel_err(got, want) < 1e-4


def test_interval_1_equals_diffusers_model_sampling(tmp_path):
    theirs = make_diffusers_dit(tmp_path / "dit")
    loaded = load_model("dit", checkpoint=tmp_path / "dit")
    manifest = build_engines(loaded, BuildOptions(batch=2, clusters=4, order=1), tmp_path / "eng").manifest
    got = Pipeline.load(manifest.directory).generate(LABELS, seed=1, method="full", steps=STEPS).latents
    want = plain_sampling(lambda x, t, y: theirs(x, timestep=t, class_labels=y).sample, manifest, LABELS, 1, STEPS)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("K", [4, 16])
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("gamma", [0.0, 0.005])
def test_clusca_engines_equal_reference(pipes, K, order, gamma):
    engine, reference = pipes[K]
    kw = dict(seed=0, method="clusca", interval=4, order=order, propagation=gamma, steps=STEPS)
    got = engine.generate(LABELS, **kw)
    want = reference.generate(LABELS, **kw)
    assert got.step_counts == {"full": 6, "partial": 14, "forecast": 0}
    assert got.provider == "cpu" and want.backend == "torch"
    assert rel_err(got.latents, want.latents) < 1e-4


@pytest.mark.parametrize("kw", [
    dict(update="residual"), dict(update="step"), dict(update="step", correction=0.5, propagation=0.2),
    dict(update="step", correction=(0.0, 1.0, 0.5, 0.0)), dict(update="residual", pair=True),
    dict(update="paper", pair=True),
    dict(update="step", pair=True, fresh="nearest"),
])
def test_update_rules_engines_equal_reference(pipes, kw):
    """Every update rule and pairing on the ONNX Runtime engines against the torch backend (the same
    step modules run eagerly), one engine directory for all (1e-4, seed 0); and each one differs
    from the paper's unpaired run."""
    engine, reference = pipes[4]
    run = dict(seed=0, method="clusca", interval=4, steps=STEPS)
    got = engine.generate(LABELS, **run, **kw)
    want = reference.generate(LABELS, **run, **kw)
    assert rel_err(got.latents, want.latents) < 1e-4
    paper = engine.generate(LABELS, **run, fresh=kw.get("fresh"), propagation=kw.get("propagation"), update="paper",
                            pair=False)
    assert rel_err(got.latents, paper.latents) > 1e-5


@pytest.mark.parametrize("update", ["step", "residual"])
def test_a_residual_rule_with_no_correction_is_taylorseer(pipes, update):
    """Correction 0: the fresh rows are computed and change nothing, so ClusCa is TaylorSeer (same full
    steps, same forecasts) to float rounding (1e-6, seed 3)."""
    engine, _ = pipes[4]
    run = dict(seed=3, interval=4, order=2, steps=STEPS)
    got = engine.generate(LABELS, method="clusca", update=update, correction=0.0, propagation=0.2, **run)
    want = engine.generate(LABELS, method="taylorseer", **run)
    assert got.step_counts["partial"] == want.step_counts["forecast"] == 14
    assert rel_err(got.latents, want.latents) < 1e-6


@pytest.mark.parametrize(
    "method, kw", [("taylorseer", {"order": 2}), ("taylorseer", {"order": 1}), ("fora", {}), ("clusca", {"fresh": "nearest"})]
)
def test_peer_methods_from_the_same_engines_equal_reference(pipes, method, kw):
    engine, reference = pipes[4]
    got = engine.generate(LABELS, seed=2, method=method, interval=3, steps=STEPS, **kw)
    want = reference.generate(LABELS, seed=2, method=method, interval=3, steps=STEPS, **kw)
    assert rel_err(got.latents, want.latents) < 1e-4


def test_methods_really_differ_and_seeds_matter(pipes):
    engine, _ = pipes[4]
    runs = {m: engine.generate(LABELS, seed=0, method=m, steps=STEPS).latents for m in ("full", "clusca", "taylorseer", "fora")}
    for a in runs:
        for b in runs:
            if a < b:
                assert rel_err(runs[a], runs[b]) > 1e-4, (a, b)
    assert rel_err(engine.generate(LABELS, seed=0, steps=STEPS).latents, runs["clusca"]) == 0.0
    assert rel_err(engine.generate(LABELS, seed=1, steps=STEPS).latents, runs["clusca"]) > 1e-2
    # propagation changes the result
    g0 = engine.generate(LABELS, seed=0, steps=STEPS, propagation=0.0).latents
    g5 = engine.generate(LABELS, seed=0, steps=STEPS, propagation=0.5).latents
    assert rel_err(g0, g5) > 1e-5


def test_caches_stay_in_the_engine(pipes, monkeypatch):
    """The denoiser never reads state back: only ``out`` comes to the host each step."""
    engine, _ = pipes[4]
    monkeypatch.setattr(type(engine.engine), "read_state", lambda *a: pytest.fail("state read by the runtime"))
    calls = []
    real_run = engine.engine.run

    def spy(graph, feeds):
        calls.append((graph, sorted(feeds)))
        return real_run(graph, feeds)

    monkeypatch.setattr(engine.engine, "run", spy)
    engine.generate([1, 2], seed=0, steps=8, interval=3)
    fed = {name for _, names in calls for name in names}
    assert fed <= {"x", "t", "y", "cond_row", "taylor_coef", "forecast_coef", "gamma", "update", "init_img", "warm",
                   "pair", "key_img", "dist_weight"}
    # the conditioning of all 8 steps in one cond call, before the first step
    assert [g for g, _ in calls][:6] == ["cond", "full", "full", "cluster_img", "select_img", "partial"]
    assert [g for g, _ in calls].count("cond") == 1


def test_method_full_runs_the_model_alone(pipes, monkeypatch):
    """method full: the cache-free plain graph every step, no Taylor cache written."""
    engine, _ = pipes[4]
    calls = []
    real_run = engine.engine.run
    monkeypatch.setattr(engine.engine, "run", lambda graph, feeds: calls.append(graph) or real_run(graph, feeds))
    engine.generate([1, 2], seed=0, steps=6, method="full")
    assert calls == ["cond"] + ["plain"] * 6


def test_a_sample_depends_on_its_own_key_alone(pipes):
    """Per-sample random streams: a sample generated beside others (another chunk layout, other
    neighbours) equals the same sample generated alone with the same key."""
    engine, _ = pipes[4]  # batch 2
    for method in ("clusca", "full"):
        together = engine.generate([3, 1, 4], keys=[(7, 0), (9, 0), (7, 1)], steps=12, method=method).latents
        alone = engine.generate([3, 4], seed=7, steps=12, method=method).latents
        other = engine.generate([1], seed=9, steps=12, method=method).latents
        np.testing.assert_allclose(together[[0, 2]], alone, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(together[1], other[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"clusters": 8}, EngineMismatchError, "engines were built with --clusters 4, requested 8"),
        ({"order": 3}, ConfigError, "order must be <= the built Taylor order 2, got 3"),
        ({"interval": 0}, ConfigError, "interval must be an integer >= 1, got 0"),
        ({"class_labels": [10]}, InputError, "class labels must be in 0..9, got 10"),
        ({"class_labels": []}, InputError, "expected at least one class label"),
        ({"steps": 0}, ConfigError, "steps must be an integer in 1..10000, got 0"),
        ({"sampler": "euler"}, ConfigError, "sampler must be one of ddim, ddpm"),
    ],
)
def test_bad_run_settings(pipes, kwargs, error, message):
    engine, _ = pipes[4]
    kwargs = {"class_labels": [1], **kwargs}
    with pytest.raises(error) as e:
        engine.generate(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
