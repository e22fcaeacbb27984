"""Issue 12, cases 4 and 7: every option range-checked before any work or allocation, every string
parsed strictly (nothing silently coerced: "" is not label 0, "12" is not [1, 2], 1.7 is not 1)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.errors import ClusCaError, ConfigError, InputError
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import BuildOptions

from .conftest import cli_error, one_line


@pytest.fixture(scope="module")
def pipe(micro):
    return Pipeline.load(micro[2].directory)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "steps must be an integer in 1..10000, got 0"),
        (["--steps", "-5"], "steps must be an integer in 1..10000, got -5"),
        (["--steps", "100000000"], "steps must be an integer in 1..10000, got 100000000"),
        (["--seed", "-1"], "seed must be an integer in 0..9223372036854775807, got -1"),
        (["--seed", str(2**64)], "seed must be an integer in 0..9223372036854775807"),
        (["--class-labels", ""], "--class-labels: expected comma-separated integers, got ''"),
        (["--class-labels", "1,,2"], "--class-labels: expected comma-separated integers, got '1,,2'"),
        (["--class-labels", "1.5"], "--class-labels: expected comma-separated integers, got '1.5'"),
        (["--class-labels", "one"], "--class-labels: expected comma-separated integers, got 'one'"),
        (["--class-labels", "--5"], "--class-labels: expected comma-separated integers, got '--5'"),
        (["--class-labels", "1 2"], "--class-labels: expected comma-separated integers, got '1 2'"),
        (["--class-labels", "10"], "class labels must be in 0..9, got 10"),
        (["--propagation", "nan"], "propagation (gamma) must be in [0, 1]"),
        (["--propagation", "1.5"], "propagation (gamma) must be in [0, 1]"),
        (["--interval", "0"], "interval must be an integer >= 1, got 0"),
        (["--warmup", "0"], "warmup must be an integer >= 1, got 0"),
        (["--order", "-1"], "order must be an integer >= 0, got -1"),
        (["--order", "2"], "order must be <= the built Taylor order 1, got 2"),
        (["--clusters", "99"], "built with --clusters 2, requested 99"),
        (["--method", "full", "--interval", "4"], "method full runs every step, so interval must be 1"),
    ],
)
def test_generate_options_are_checked_before_sampling(micro, tmp_path, args, message):
    out = tmp_path / "a.npz"
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), *args, "--out", str(out)])
    assert message in cli_error(r)
    assert time.perf_counter() - t0 < 5 and not out.exists()


def test_class_labels_with_spaces_are_fine(micro, tmp_path):
    out = tmp_path / "a.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--class-labels", " 1, 2 ", "--steps", "3",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert np.load(out)["labels"].tolist() == [1, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-B", "0"], "batch must be an integer in 1..1024, got 0"),
        (["-B", "100000000"], "batch must be an integer in 1..1024, got 100000000"),
        (["--kmeans-iterations", "0"], "kmeans iterations must be an integer in 1..100, got 0"),
        (["--kmeans-iterations", "1000000"], "kmeans iterations must be an integer in 1..100, got 1000000"),
        (["--order", "9"], "order must be an integer in [0, 8], got 9"),
        (["--clusters", "-1"], "clusters must be an integer >= 0, got -1"),
        (["--text-clusters", "-2"], "text clusters must be an integer >= 0 or None, got -2"),
        (["--seed", "-1"], "seed must be an integer in 0..9223372036854775807, got -1"),
    ],
)
def test_build_options_are_checked_before_loading(tmp_path, monkeypatch, args, message):
    import clusca_trt.models as models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    if "--seed" not in args:  # the seed is checked by the loader, before any weights
        monkeypatch.setattr(models, "load_model", refuse)
    out = tmp_path / "e"
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["-q", "build", "--model", "dit-tiny", "--random-init", *args, "--out", str(out)])
    assert message in cli_error(r)
    assert time.perf_counter() - t0 < 5 and not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", ""], "model must be one of"),
        (["--model", "flux-tiny", "--height", "100000"], "height must be a positive multiple of 16, got 100000 (at most 8192)"),
        (["--model", "flux-tiny", "--width", "8208"], "width must be a positive multiple of 16, got 8208 (at most 8192)"),
        (["--model", "flux-tiny", "--width", "0"], "width must be a positive multiple of 16, got 0"),
        (["--model", "flux-tiny", "--text-length", "0"], "text length must be an integer in 1..512, got 0"),
        (["--model", "flux-tiny", "--text-length", "100000"], "text length must be an integer in 1..512, got 100000"),
        (["--model", "hunyuan-video-tiny", "--frames", "100001"], "frames must be 4 k + 1 (1, 5, 9, ...), got 100001"),
        (["--model", "hunyuan-video-tiny", "--frames", "8"], "frames must be 4 k + 1 (1, 5, 9, ...), got 8"),
        (["--model", "hunyuan-video-tiny", "--height", "16400"], "height must be a positive multiple of 16, got 16400"),
    ],
)
def test_model_names_and_shapes_are_checked_before_any_export(tmp_path, monkeypatch, args, message):
    def refuse(*a, **k):
        raise AssertionError("export started")

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", refuse)
    out = tmp_path / "e"
    random = [] if args[1] == "" else ["--random-init"]
    r = CliRunner().invoke(main, ["-q", "build", *random, *args, "--out", str(out)])
    assert message in cli_error(r)
    assert not out.exists()


@pytest.mark.parametrize(
    "labels, message",
    [
        ("12", "expected class labels as a list of integers, got str '12'"),
        (b"12", "expected class labels as a list of integers"),
        (7, "expected class labels as a list of integers, got int 7"),
        (None, "expected class_labels for a dit model, got none"),
        ([1.7, 2.2], "expected integer class labels, got 1.7 (float)"),
        ([1, 2.0], "expected integer class labels, got 2.0 (float)"),
        ([True, False], "expected integer class labels, got True (bool)"),
        (np.array([1.0, 2.0]), "expected integer class labels, got 1.0"),
        (np.array([[1, 2]]), "expected class labels as a 1-D list of integers"),
        (["1", "2"], "expected integer class labels, got '1' (str)"),
        ([], "expected at least one class label, got none"),
        ([-1], "class labels must be in 0..9, got -1"),
    ],
)
def test_class_labels_are_parsed_strictly(pipe, labels, message):
    with pytest.raises(InputError) as e:
        pipe.generate(labels, steps=3)
    assert message in one_line(e)


def test_integer_arrays_are_labels(pipe):
    a = pipe.generate(np.array([1, 2], dtype=np.int32), steps=3, seed=0).latents
    b = pipe.generate([1, 2], steps=3, seed=0).latents
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"steps": 100_000_000}, ConfigError, "steps must be an integer in 1..10000, got 100000000"),
        ({"steps": 10.0}, ConfigError, "steps must be an integer in 1..10000, got 10.0"),
        ({"steps": True}, ConfigError, "steps must be an integer in 1..10000, got True"),
        ({"steps": "10"}, ConfigError, "steps must be an integer in 1..10000, got '10'"),
        ({"seed": -1}, InputError, "seed must be an integer in 0..9223372036854775807, got -1"),
        ({"seed": 2**64}, InputError, "seed must be an integer in 0..9223372036854775807"),
        ({"seed": 1.5}, InputError, "seed must be an integer in 0..9223372036854775807, got 1.5"),
        ({"interval": True}, ConfigError, "interval must be an integer >= 1, got True"),
        ({"interval": 2.5}, ConfigError, "interval must be an integer >= 1, got 2.5"),
        ({"propagation": "0.5"}, ConfigError, "propagation (gamma) must be in [0, 1]"),
        ({"propagation": float("nan")}, ConfigError, "propagation (gamma) must be in [0, 1]"),
        ({"warmup": False}, ConfigError, "warmup must be an integer >= 1, got False"),
        ({"order": 1.0}, ConfigError, "order must be an integer >= 0, got 1.0"),
    ],
)
def test_run_settings_are_checked_strictly_and_at_once(pipe, kwargs, error, message):
    t0 = time.perf_counter()
    with pytest.raises(error) as e:
        pipe.generate([1], **{"steps": 3, **kwargs})
    assert message in one_line(e) and time.perf_counter() - t0 < 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch": 100_000_000}, "batch must be an integer in 1..1024, got 100000000"),
        ({"batch": True}, "batch must be an integer in 1..1024, got True"),
        ({"kmeans_iterations": 1_000_000}, "kmeans iterations must be an integer in 1..100, got 1000000"),
        ({"kmeans_iterations": 2.5}, "kmeans iterations must be an integer in 1..100, got 2.5"),
        ({"opset": 18.0}, "opset must be in 18..20, got 18.0"),
    ],
)
def test_build_options_are_bounded(kwargs, message):
    with pytest.raises(ConfigError) as e:
        BuildOptions(**kwargs)
    assert message in one_line(e)


def test_a_build_too_large_for_this_machine_is_refused_before_allocating():
    from clusca_trt.exporters.build import check_memory
    from clusca_trt.models import flux

    spec = flux.export_spec(flux.NAMED_CONFIGS["flux-dev"], BuildOptions(batch=64, clusters=16, order=2))
    with pytest.raises(ConfigError) as e:
        check_memory(spec)
    assert "GiB for its engine state (batch 64" in one_line(e) and "lower --batch" in str(e.value)


def test_every_refusal_is_a_clusca_error():
    assert issubclass(InputError, ClusCaError) and issubclass(ConfigError, ClusCaError)
