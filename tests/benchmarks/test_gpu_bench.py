"""benchmarks/gpu.py end to end at tiny sizes (the CPU here; the same code the H200 runs at full
size through scripts/gpu-check.sh): every model and method measured and written, our full step
equal to eager diffusers on the same weights, host synchronisations per sample counted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
STEPS = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path_factory.mktemp("gpu-bench")
    code = bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--steps", str(STEPS), "--warmup-steps", "2",
                       "--repeats", "1"])
    assert code == 0
    assert (out / "gpu-bench.md").read_text().startswith("# GPU benchmark (tiny sizes, cpu")
    return json.loads((out / "gpu-bench.json").read_text())


def test_every_model_and_method_is_measured(report):
    assert [r["model"] for r in report["results"]] == ["DiT-tiny fp32", "DiT-tiny bf16", "FLUX.1-dev size (tiny) bf16"]
    for r in report["results"]:
        assert list(r["methods"]) == ["full", "clusca", "taylorseer", "diffusers"]
        for key, row in r["methods"].items():
            assert row["latency_s"] > 0 and len(row["runs_s"]) == 1 and row["speedup_vs_full"] > 0
            if key != "diffusers":
                assert row["flops"] > 0 and row["efficiency"] > 0
        assert r["methods"]["full"]["flops_speedup"] == 1.0
        assert r["methods"]["clusca"]["flops_speedup"] > 1.0 and r["methods"]["taylorseer"]["flops_speedup"] > 1.0
        assert r["device_memory_mib"]["weights"] > 0


def test_host_syncs_per_sample_are_counted(report):
    for r in report["results"]:
        for key in ("full", "clusca", "taylorseer"):
            assert r["methods"][key]["host_syncs_per_sample"] == 1  # the loop on the device: the final latents


def test_our_full_step_equals_eager_diffusers_on_the_same_weights(report):
    dit32, dit16, flux = report["results"]
    assert dit32["methods"]["diffusers"]["rel_l2_vs_full"] < 1e-4  # fp32: the same model, converted
    assert dit16["methods"]["diffusers"]["rel_l2_vs_full"] < 5e-2
    assert flux["methods"]["diffusers"]["rel_l2_vs_full"] < 5e-2
