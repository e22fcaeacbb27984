"""The command line: build, generate, inspect on a tiny model, and one-line errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "eng"
    r = CliRunner().invoke(main, ["-q", "build", "--model", "dit-tiny", "--random-init", "--clusters", "4",
                                  "--order", "1", "--batch", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_build_reuses(built):
    r = CliRunner().invoke(main, ["-q", "build", "--model", "dit-tiny", "--random-init", "--clusters", "4",
                                  "--order", "1", "--batch", "2", "--out", str(built)])
    assert r.exit_code == 0 and "up to date" in r.output


def test_generate_npz(built, tmp_path):
    out = tmp_path / "lat.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(built), "--class-labels", "1,2,3", "--steps", "10",
                                  "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "clusca (N=5, K=4, O=1" in r.output and "onnxruntime/cpu" in r.output
    data = np.load(out)
    assert data["latents"].shape == (3, 4, 16, 16) and data["labels"].tolist() == [1, 2, 3]
    assert np.isfinite(data["latents"]).all()


def test_generate_methods_agree_with_api(built, tmp_path):
    from clusca_trt import Pipeline

    out = tmp_path / "f.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(built), "--method", "fora", "--interval", "3",
                                  "--class-labels", "5", "--steps", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    api = Pipeline.load(built).generate([5], method="fora", interval=3, steps=8)
    np.testing.assert_array_equal(np.load(out)["latents"], api.latents)


def test_inspect(built):
    r = CliRunner().invoke(main, ["inspect", str(built), "--verify"])
    assert r.exit_code == 0, r.output
    assert "RANDOM weights" in r.output and "partial" in r.output and "mlp_f0_3_out[4, 64, 64]" in r.output
    j = json.loads(CliRunner().invoke(main, ["inspect", str(built), "--json"]).output)
    assert j["build"]["clusters"] == 4 and j["cache"]["bytes"] == 4 * (2 * 2) * 4 * 4 * 64 * 64
    assert set(j["graphs"]) == {"cond", "plain", "full", "partial", "forecast", "cluster_img", "select_img"}
    cpu = j["cpu_backends"]  # what the CPU backends run here (OpenVINO: bf16 only where the CPU has bf16 units)
    assert cpu["onnxruntime"] == {"precision": "fp32"}
    if "precision" in cpu["openvino"]:  # OpenVINO installed (the test extra has it)
        assert cpu["openvino"]["precision"] == ("bf16" if "BF16" in cpu["openvino"]["capabilities"] else "fp32")
    assert "openvino cache" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "{eng}", "--interval", "0", "--out", "{tmp}/a.npz"], "interval must be an integer >= 1, got 0"),
        (["generate", "{eng}", "--clusters", "16", "--out", "{tmp}/a.npz"], "built with --clusters 4, requested 16"),
        (["generate", "{eng}", "--out", "{tmp}/a.png"], "expected a model with a decoder"),
        (["generate", "{tmp}/nothing", "--out", "{tmp}/a.npz"], "expected an engine directory with manifest.json"),
        (["generate", "{eng}", "--provider", "cuda", "--out", "{tmp}/a.npz"], "provider cuda does not load"),
        (["build", "--model", "dit-tiny", "--random-init", "--clusters", "65", "--out", "{tmp}/e"],
         "clusters must be <= the 64 img tokens, got 65"),
        (["build", "--model", "dit-xl-2", "--out", "{tmp}/e"], "needs a checkpoint"),
        (["build", "--model", "dit-tiny", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/e"], "checkpoint not found"),
    ],
)
def test_errors_are_one_line_and_nonzero(built, tmp_path, args, message):
    args = [a.format(eng=built, tmp=tmp_path) for a in args]
    r = CliRunner().invoke(main, ["-q", *args])
    assert r.exit_code != 0
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "e").exists()


def test_help_works():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "build" in r.output and "generate" in r.output
