"""The newcomer path on the built-in default model: ``build`` with no --model builds the trained
``dit-digits``; ``generate`` writes images; ``generate --compare`` writes one grid row per method."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clusca_trt.cli import main


@pytest.fixture(scope="module")
def default_engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "eng"
    r = CliRunner().invoke(main, ["-q", "build", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "built (dit-digits, K=16, O=2, batch=1" in r.output
    return out


def test_build_without_model_uses_the_trained_builtin(default_engines):
    info = json.loads(CliRunner().invoke(main, ["inspect", str(default_engines), "--json"]).output)
    src = info["model"]["source"]
    assert info["model"]["name"] == "dit-digits" and src["kind"] == "builtin" and len(src["sha256"]) == 64
    assert "RANDOM" not in info["model"]["source_summary"]


def test_generate_stores_images_and_labels(default_engines, tmp_path):
    out = tmp_path / "samples.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(default_engines), "--class-labels", "0,1,2", "--steps", "4",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = np.load(out)
    assert data["images"].shape == (3, 32, 32, 1) and data["images"].dtype == np.float32
    assert 0.0 <= data["images"].min() and data["images"].max() <= 1.0
    assert data["labels"].tolist() == [0, 1, 2]


def test_generate_compare_writes_one_row_per_method(default_engines, tmp_path):
    out = tmp_path / "compare.png"
    r = CliRunner().invoke(main, ["-q", "generate", str(default_engines), "--compare", "--class-labels", "3,4",
                                  "--steps", "7", "--interval", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = [ln.split()[0] for ln in r.output.splitlines() if "x vs full" in ln]
    assert lines == ["full", "clusca", "fora", "taylorseer"]
    img = np.asarray(Image.open(out))
    assert img.shape[0] == 4 * 64  # four rows of 32-px samples drawn at 2x
    assert img.shape[1] == 200 + 2 * 64  # the label margin and two samples


def test_compare_needs_a_png(default_engines, tmp_path):
    r = CliRunner().invoke(main, ["-q", "generate", str(default_engines), "--compare", "--steps", "2",
                                  "--out", str(tmp_path / "a.npz")])
    assert r.exit_code != 0 and "expected a .png file with --compare, got a.npz" in r.output
    assert not (tmp_path / "a.npz").exists()
