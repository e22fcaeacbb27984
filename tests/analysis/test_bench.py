"""``clusca-trt bench``: the result's contents, the regression comparison and the refusal of a
baseline measured otherwise. No test here depends on how fast anything ran."""

import copy
import math
import json

import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.errors import ConfigError
from clusca_trt.analysis.bench import (
    BaselineMismatchError,
    BenchSettings,
    LatencyRegressionError,
    check_regression,
    compare,
    format_table,
    parse_tolerance,
    run_bench,
)
from clusca_trt.runtime.pipeline import Pipeline

FAST = BenchSettings(steps=6, repeats=1, warmup_runs=0, profile_calls=1)


@pytest.fixture(scope="module")
def result(engines_k4):
    with Pipeline.load(engines_k4.directory) as pipe:
        return run_bench(pipe, FAST)


def fake(run_ms: dict, **changes) -> dict:
    """A minimal bench result as ``compare`` reads it."""
    r = {
        "format": 1, "device": "cpu-x (2 CPUs)", "provider": "cpu", "backend": "onnxruntime", "threads": None,
        "engine": {"key": "abc"}, "versions": {"clusca-trt": "0.1.0", "onnxruntime-gpu": "1.31.1", "numpy": "2.4",
                                               "python": "3.11.9"},
        "settings": {"steps": 50, "sampler": "ddim", "interval": None, "propagation": None, "order": None,
                     "warmup": None, "fresh": None},
        "run_ms": dict(run_ms),
    }
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        d = r
        for p in parents:
            d = d[p]
        d[leaf] = value
    return r


def test_result_has_the_documented_keys(result):
    for key in ("flops_speedup", "wall_speedup", "efficiency", "overhead_share", "latency_ms", "run_ms",
                "device", "provider", "versions", "methods", "memory"):
        assert key in result, key
    assert set(result["latency_ms"]) == {"cond", "plain", "full", "cluster", "select", "partial", "forecast"}
    assert set(result["run_ms"]) == {"full", "clusca", "fora", "taylorseer"}
    clusca = result["methods"]["clusca"]
    assert clusca["calls"] == {"cond": 1, "plain": 0, "full": 2, "cluster": 1, "select": 4, "partial": 4, "forecast": 0}
    assert result["methods"]["full"]["calls"]["plain"] == 6 and result["methods"]["full"]["calls"]["full"] == 0
    assert set(clusca["overhead_ms"]) == {"clustering", "selection", "gather", "propagation"}
    assert 0.0 < result["overhead_share"] < 1.0
    # FLOPs are analytic: the schedule's, not a timing
    assert result["methods"]["full"]["flops_speedup"] == 1.0
    assert 1.0 < clusca["flops_speedup"] < result["methods"]["taylorseer"]["flops_speedup"]
    assert result["efficiency"] == pytest.approx(result["wall_speedup"] / result["flops_speedup"], rel=1e-3)
    json.dumps(result)  # JSON-able as written by --json


@pytest.mark.parametrize("text, want", [("10%", 0.10), ("2.5%", 0.025), ("0.2", 0.2), (0.05, 0.05), ("0%", 0.0)])
def test_tolerance(text, want):
    assert parse_tolerance(text) == pytest.approx(want)


@pytest.mark.parametrize("text", ["ten", "-5%", "2000%", ""])
def test_bad_tolerance(text):
    with pytest.raises(ConfigError, match="max regression must be"):
        parse_tolerance(text)


@pytest.mark.parametrize(
    "now, regressed",
    [
        ({"full": 1000.0, "clusca": 300.0}, []),
        ({"full": 1099.0, "clusca": 300.0}, []),  # within 10%
        ({"full": 1101.0, "clusca": 300.0}, ["full"]),
        ({"full": 900.0, "clusca": 400.0}, ["clusca"]),  # faster elsewhere does not compensate
        ({"full": 2000.0, "clusca": 331.0}, ["full", "clusca"]),
        ({"full": 1000.0, "fora": 1.0}, []),  # only methods in both are compared
    ],
)
def test_compare_flags_regressions_beyond_the_tolerance(now, regressed):
    baseline = fake({"full": 1000.0, "clusca": 300.0})
    got = compare(fake(now), baseline, 0.10)
    assert [r.method for r in got] == regressed


@pytest.mark.parametrize(
    "change, what",
    [
        ({"device": "another CPU (16 CPUs)"}, "device"),
        ({"provider": "cuda"}, "provider"),
        ({"backend": "torch"}, "backend"),
        ({"threads": 1}, "threads"),
        ({"engine.key": "rebuilt"}, "engines (key)"),
        ({"versions.onnxruntime-gpu": "1.20.0"}, "onnxruntime-gpu version"),
        ({"versions.clusca-trt": "0.2.0"}, "clusca-trt version"),
        ({"settings.steps": 20}, "setting steps"),
        ({"settings.interval": 4}, "setting interval"),
        ({"backend": "openvino", "versions.openvino": "2025.0"}, "backend"),
    ],
)
def test_a_baseline_measured_otherwise_is_refused(change, what):
    baseline = fake({"full": 1000.0}, **change)
    with pytest.raises(BaselineMismatchError) as e:
        compare(fake({"full": 1.0}), baseline, 0.10)
    msg = str(e.value)
    assert msg.startswith(f"baseline not comparable: it was recorded with {what} ") and "\n" not in msg


def test_no_common_method_is_refused():
    with pytest.raises(BaselineMismatchError, match="has methods"):
        compare(fake({"clusca": 1.0}), fake({"fora": 1.0}), 0.1)


def test_user_latency_guard_example(result):
    """The pattern of docs/benchmarking.md: a baseline JSON and ``check_regression`` in a test."""
    slower_baseline = copy.deepcopy(result)
    slower_baseline["run_ms"] = {m: v * 1000 for m, v in result["run_ms"].items()}
    check_regression(result, slower_baseline, "10%")  # faster than the baseline: passes
    faster_baseline = copy.deepcopy(result)
    faster_baseline["run_ms"] = {m: v / 1000 for m, v in result["run_ms"].items()}
    with pytest.raises(LatencyRegressionError, match=r"latency regression beyond 10%: full run .* vs baseline"):
        check_regression(result, faster_baseline, "10%")


def test_cli_bench_json_baseline_and_refusal(engines_k4, tmp_path):
    runner = CliRunner()
    args = ["bench", str(engines_k4.directory), "--steps", "6", "--repeats", "1", "--warmup-runs", "0",
            "--profile-calls", "0", "--methods", "clusca"]
    out = tmp_path / "bench.json"
    r = runner.invoke(main, [*args, "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "wall x" in r.output and "FLOPs x" in r.output
    data = json.loads(out.read_text())
    assert set(data["run_ms"]) == {"full", "clusca"}

    slow = dict(data, run_ms={m: v * 1000 for m, v in data["run_ms"].items()})
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    r = runner.invoke(main, [*args, "--baseline", str(tmp_path / "slow.json"), "--max-regression", "10%"])
    assert r.exit_code == 0 and "no latency regression" in r.output

    fast = dict(data, run_ms={m: v / 1000 for m, v in data["run_ms"].items()})
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    r = runner.invoke(main, [*args, "--baseline", str(tmp_path / "fast.json")])
    assert r.exit_code == 1 and "latency regression beyond 10%" in r.output

    other = dict(data, device="a different machine")
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = runner.invoke(main, [*args, "--baseline", str(tmp_path / "other.json")])
    assert r.exit_code == 2 and "baseline not comparable: it was recorded with device 'a different machine'" in r.output

    (tmp_path / "junk.json").write_text("{}")
    r = runner.invoke(main, [*args, "--baseline", str(tmp_path / "junk.json")])
    assert r.exit_code == 1 and "expected a benchmark JSON" in r.output


def test_traffic_counts_what_a_partial_call_must_read(engines_k4):
    """Weights + inputs, with only the gathered rows of the conditioning tables (not the tables)."""
    from clusca_trt.analysis.bench import graph_traffic

    spec = engines_k4.spec
    B = spec.graph_batch
    caches = sum(4 * math.prod(t.shape) for t in spec.cache_tensors())
    rows = sum(4 * B * math.prod(t.shape[1:]) for t in spec.cond_tensors)
    small = sum((8 if t.dtype == "int64" else 4) * math.prod(t.shape) for t in spec.graphs["partial"].inputs
                if t.name not in {c.name for c in spec.cache_tensors()} and not t.name.endswith("_table"))
    t = graph_traffic(spec, "partial", weight_bytes=1000)
    out = spec.graphs["partial"].outputs  # out, then the new F_0 of every block of the MLP cache
    assert [o.name for o in out] == ["out"] + [f"mlp_f0_{i}_out" for i in range(4)]
    assert t == {"read": 1000 + caches + rows + small, "weights": 1000, "inputs": caches + rows + small,
                 "written": sum(4 * math.prod(o.shape) for o in out)}


def test_result_reports_bytes_and_bandwidth(result):
    traffic = result["traffic"]
    assert traffic["bandwidth_gb_s"] > 0.1
    partial = traffic["graphs"]["partial"]
    assert partial["read_mb"] == pytest.approx(partial["weights_mb"] + partial["inputs_mb"], abs=0.02)
    assert partial["gb_s"] == pytest.approx(partial["read_mb"] / partial["ms"], rel=0.02)
    assert "GB/s" in format_table(result)


@pytest.mark.parametrize("read, flops, want", [
    (10e9, 1e9, (1.0, "bytes")),  # 10 GB at 10 GB/s: 1 s; 1 GFLOP at 100 GFLOP/s: 0.01 s
    (1e9, 50e9, (0.5, "flops")),  # 0.1 s of bytes, 0.5 s of FLOPs
    (0, 0, (0.0, "bytes")),
])
def test_a_graph_floor_is_the_larger_of_bytes_and_flops(read, flops, want):
    from clusca_trt.analysis.bench import graph_floor

    assert graph_floor(read, flops, bandwidth=10e9, matmul=100e9) == pytest.approx(want)


def test_result_reports_floors_of_graphs_and_runs(result):
    traffic = result["traffic"]
    assert traffic["matmul_gflop_s"] > 0.1 and traffic["precision"] == "fp32"
    for g, t in traffic["graphs"].items():
        assert t["floor_ms"] == pytest.approx(max(t["memory_floor_ms"], t["compute_floor_ms"]), abs=1e-3), g
    per_call = {g: t["floor_ms"] for g, t in traffic["graphs"].items()}
    clusca = result["methods"]["clusca"]
    # 6 steps, N=5 default: cond once, 2 full, 1 cluster, 4 select + partial (the counts of test_result_has_...)
    want = (per_call["cond"] + 2 * per_call["full"] + per_call["cluster_img"] + 4 * per_call["select_img"]
            + 4 * per_call["partial"])
    assert clusca["floor_ms"] == pytest.approx(want, rel=1e-3)
    assert clusca["x_floor"] == pytest.approx(clusca["run_ms"] / clusca["floor_ms"], rel=1e-2)
    assert result["methods"]["full"]["floor_ms"] == pytest.approx(per_call["cond"] + 6 * per_call["plain"], rel=1e-3)
    assert "its floor" in format_table(result)


def test_openvino_runs_compare_the_openvino_version_only():
    """A baseline from before OpenVINO was recorded stays comparable for ONNX Runtime runs; an
    OpenVINO run's baseline must have its OpenVINO version."""
    assert compare(fake({"full": 1.0}, **{"versions.openvino": "2026.4"}), fake({"full": 1.0}), 0.1) == []
    ov_now = fake({"full": 1.0}, backend="openvino", **{"versions.openvino": "2026.4"})
    ov_then = fake({"full": 1.0}, backend="openvino", **{"versions.openvino": "2025.0"})
    with pytest.raises(BaselineMismatchError, match="it was recorded with openvino version '2025.0'"):
        compare(ov_now, ov_then, 0.1)
