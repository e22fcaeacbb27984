"""The command line on a tiny FLUX: a second resolution built into the same engine directory,
chosen at run time; prompts to PNG and NPZ; one-line errors for bad folders, sizes and prompts."""

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main

BUILD = ["--text-length", "16", "--clusters", "4", "--text-clusters", "2", "--order", "1", "--batch", "1"]


@pytest.fixture(scope="module")
def engine_root(flux_engines, flux_folder):
    """The session's directory of FLUX builds (128x128), plus a 128x64 build made by the CLI."""
    root = flux_engines.directory.parent
    r = CliRunner().invoke(main, ["-q", "build", "--model", "flux", "--checkpoint", str(flux_folder),
                                  "--height", "128", "--width", "64", *BUILD, "--out", str(root)])
    assert r.exit_code == 0, r.output
    assert f"{root / '128x64'}: built (flux, K=4, O=1, batch=1" in r.output
    return root


def test_two_resolutions_share_one_directory(engine_root):
    assert sorted(p.name for p in engine_root.iterdir()) == ["128x128", "128x64"]
    r = CliRunner().invoke(main, ["inspect", str(engine_root / "128x64")])
    assert r.exit_code == 0 and "hidden_states[1, 32, 16]" in r.output and "select_txt" in r.output


def test_generate_png_at_the_chosen_resolution(engine_root, tmp_path):
    from PIL import Image

    out = tmp_path / "couple.png"
    r = CliRunner().invoke(main, ["-q", "generate", str(engine_root), "--height", "128", "--width", "64", "--prompt",
                                  "an oil painting of a couple under an umbrella", "--steps", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 samples, clusca (N=6, K=4, O=1, gamma=0.005), 8 steps on onnxruntime/cpu" in r.output
    assert Image.open(out).size == (64, 128)


def test_generate_npz_agrees_with_api(engine_root, tmp_path):
    from clusca_trt import Pipeline

    out = tmp_path / "two.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(engine_root), "--width", "128", "-p", "a cat", "-p", "the sea",
                                  "--method", "taylorseer", "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "50 steps" in r.output  # FLUX-dev's default
    data = np.load(out)
    assert set(data.files) == {"latents", "images"} and data["images"].shape == (2, 128, 128, 3)
    api = Pipeline.load(engine_root, select={"width": 128}).generate(["a cat", "the sea"], method="taylorseer", seed=3)
    np.testing.assert_array_equal(data["latents"], api.latents)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "{eng}", "-p", "a cat", "--out", "{tmp}/a.png"],
         "holds builds 128x128, 128x64: expected a choice of width, got none"),
        (["generate", "{eng}", "--width", "32", "-p", "a cat", "--out", "{tmp}/a.png"],
         "holds builds 128x128, 128x64, none for width=32"),
        (["generate", "{eng}/128x128", "--width", "64", "-p", "a cat", "--out", "{tmp}/a.png"],
         "were built for width=128, requested width=64"),
        (["generate", "{eng}", "--width", "128", "-p", "a " * 20, "--out", "{tmp}/a.png"],
         "prompt 0 is 21 T5 tokens, expected at most the built text length 16"),
        (["generate", "{eng}", "--width", "128", "--class-labels", "1", "--out", "{tmp}/a.png"],
         "expected --prompt for a flux model, got --class-labels"),
        (["build", "--model", "flux", "--checkpoint", "{tmp}", "--out", "{tmp}/e"],
         "expected a FLUX pipeline folder (transformer/config.json) or a FluxTransformer2DModel folder"),
        (["build", "--model", "flux", "--checkpoint", "{folder}", "--height", "100", "--out", "{tmp}/e"],
         "height must be a positive multiple of 16, got 100"),
        (["build", "--model", "flux", "--checkpoint", "{folder}", "--text-length", "16", "--text-clusters", "17",
          "--out", "{tmp}/e"], "clusters must be <= the 16 txt tokens, got 17"),
    ],
)
def test_errors_are_one_line_and_nonzero(engine_root, flux_folder, tmp_path, args, message):
    args = [a.format(eng=engine_root, tmp=tmp_path, folder=flux_folder) for a in args]
    r = CliRunner().invoke(main, ["-q", *args])
    assert r.exit_code != 0
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "e").exists()
