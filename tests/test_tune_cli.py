"""``clusca-trt tune`` end to end on a tiny random-weight DiT: --write stores the chosen settings
as the build's defaults (generate, Pipeline.generate and the server use them, inspect shows where
they came from), the manifest stays valid when tune is killed at any moment, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.config import ClusCaConfig
from clusca_trt.engines.manifest import MANIFEST, Manifest, replace_manifest, write_defaults
from clusca_trt.errors import EngineError
from clusca_trt.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
TUNE = ["--steps", "12", "--samples", "4", "--max-interval", "6", "--budget-minutes", "1", "--threads", "1"]


BUILD = ["-q", "build", "--model", "dit-tiny", "--random-init", "--clusters", "4", "--order", "2", "--batch", "2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune-build") / "eng"
    r = CliRunner().invoke(main, [*BUILD, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def fresh(built, tmp_path) -> Path:
    """A copy of the untuned build (the manifest names its build folder relative to the directory)."""
    return Path(shutil.copytree(built, tmp_path / "eng"))


@pytest.fixture(scope="module")
def tuned(built, tmp_path_factory):
    """A build tuned with --write, and the JSON of that tune."""
    out = Path(shutil.copytree(built, tmp_path_factory.mktemp("tune") / "eng"))
    report = out.parent / "tune.json"
    r = CliRunner().invoke(main, ["-q", "tune", str(out), "--min-psnr", "62", *TUNE, "--write",
                                  "--json", str(report), "--plot", str(out.parent / "front.png")])
    assert r.exit_code == 0, r.output
    assert "Pareto front" in r.output and "defaults set to" in r.output
    return out, json.loads(report.read_text())


def test_write_then_generate_uses_the_settings(tuned, tmp_path):
    out, report = tuned
    chosen = ClusCaConfig(**report["chosen"]["config"])
    manifest = Manifest.read(out)
    assert ClusCaConfig(**manifest.defaults) == chosen
    assert manifest.defaults_source["tool"] == "tune" and manifest.defaults_source["min_psnr"] == 62.0
    with Pipeline.load(out) as pipe:
        res = pipe.generate([1, 2], steps=12, seed=3)
        assert res.config == chosen  # the method too: the defaults' method
        other = pipe.generate([1, 2], steps=12, seed=3, method="clusca")  # told otherwise
        assert other.config.method.value == "clusca" and other.config.interval == chosen.interval
    npz = tmp_path / "x.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(out), "--class-labels", "1,2", "--steps", "12", "--seed", "3",
                                  "--out", str(npz)])
    assert r.exit_code == 0, r.output
    assert f"{chosen.method.value} (N={chosen.interval}, K={chosen.clusters}, O={chosen.order}" in r.output
    np.testing.assert_array_equal(np.load(npz)["latents"], res.latents)
    assert (out.parent / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_shows_the_defaults_and_where_they_came_from(tuned):
    out, report = tuned
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("defaults"))
    assert line.split()[1] == f"{report['chosen']['method']}:" and "from clusca-trt tune" in line
    assert "PSNR >= 62 dB" in line
    info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert info["defaults_source"]["tool"] == "tune" and info["defaults"] == report["chosen"]["config"]


def test_the_server_takes_the_defaults_method(tuned):
    from clusca_trt.serve.protocol import ModelInfo, parse_request

    out, report = tuned
    info = ModelInfo.from_manifest(Manifest.read(out))
    request = parse_request(b'{"class_labels": [1], "steps": 12}', info, 4)
    assert request.config == ClusCaConfig(**report["chosen"]["config"])


def test_a_fresh_build_says_its_defaults_are_the_familys(fresh):
    out = fresh
    r = CliRunner().invoke(main, ["inspect", str(out)])
    line = next(ln for ln in r.output.splitlines() if ln.startswith("defaults"))
    assert line.split()[1] == "clusca:" and "interval=5" in line and "(the model family's, set by the build)" in line
    assert Manifest.read(out).defaults_source is None


@pytest.mark.parametrize("args, message", [
    (["--min-psnr", "150"], "min_psnr must be a finite number"),
    ([], "expected at least one of --min-psnr, --min-ssim, --max-seconds, got none"),
    (["--min-psnr", "99", *TUNE], "the best PSNR found is"),
    (["--min-psnr", "30", "--budget-minutes", "0.0001", "--steps", "12"], "too small to run full compute once"),
    (["--min-psnr", "30", "--prompt", "a cat"], "expected inputs of a dit model, got prompt"),
    (["--min-psnr", "30", "--plot", "x.jpg"], "expected a .png file"),
])
def test_one_line_errors(tuned, args, message):
    out, _ = tuned
    before = (out / MANIFEST).read_bytes()
    r = CliRunner().invoke(main, ["-q", "tune", str(out), *args, "--write"])
    assert r.exit_code != 0
    err = r.output.strip().splitlines()[-1]
    assert message in err, r.output
    assert (out / MANIFEST).read_bytes() == before  # nothing written on failure


# -- write_defaults ----------------------------------------------------------------------------


def test_write_defaults_refuses_a_rebuilt_directory(fresh):
    out = fresh
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(EngineError, match="rebuilt meanwhile"):
        write_defaults(out, ClusCaConfig(interval=3), {"tool": "tune"}, build_dir=".builds/other")
    with pytest.raises(EngineError, match="expected defaults_source to be plain JSON"):
        write_defaults(out, ClusCaConfig(interval=3), {"tool": "tune", "psnr": float("nan")})
    assert (out / MANIFEST).read_bytes() == before
    m = write_defaults(out, ClusCaConfig(interval=3, clusters=0, order=1), {"tool": "tune"},
                       build_dir=Manifest.read(out).data["build_dir"])
    assert Manifest.read(out).data == m.data and m.defaults["interval"] == 3


def test_write_defaults_leaves_the_old_manifest_when_the_rename_fails(fresh, monkeypatch):
    out = fresh
    before = (out / MANIFEST).read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_defaults(out, ClusCaConfig(interval=3), {"tool": "tune"})
    assert (out / MANIFEST).read_bytes() == before
    assert not list(out.glob(f".{MANIFEST}.*"))  # no temporary left


@pytest.mark.parametrize("source, message", [
    ([1], "expected manifest.defaults_source to be an object or null"),
    ({"created": "x"}, "expected defaults_source.tool, got none"),
])
def test_a_bad_defaults_source_is_refused_when_read(fresh, source, message):
    out = fresh
    data = json.loads((out / MANIFEST).read_text())
    data["defaults_source"] = source
    replace_manifest(out, data)  # sealed: what is refused is the source itself
    with pytest.raises(EngineError, match=message):
        Manifest.read(out)


# -- killed at any moment ----------------------------------------------------------------------


def test_the_manifest_stays_valid_when_tune_is_killed_at_any_moment(fresh):
    """kill -9 a ``tune --write`` at random moments (seeded) over its whole run, the write included:
    the manifest always loads (schema, files, graphs) with the old defaults or a new set."""
    out = fresh
    original = Manifest.read(out).defaults
    cmd = [sys.executable, "-m", "clusca_trt.cli", "-q", "tune", str(out), "--min-psnr", "62", "--steps", "8",
           "--samples", "2", "--max-interval", "4", "--budget-minutes", "0.5", "--threads", "1", "--write"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    length = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    assert Manifest.read(out).defaults_source["tool"] == "tune"
    write_defaults(out, ClusCaConfig(**original), {"tool": "test"})  # back to the old defaults
    original_source = Manifest.read(out).defaults_source
    rng = np.random.default_rng(0)
    # uniform over the run, and a few in its last tenth (where the write happens)
    moments = list(rng.uniform(0.0, length, 4)) + list(rng.uniform(0.9 * length, 1.05 * length, 4))
    for at in moments:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        manifest = Manifest.read(out)  # schema-checked
        manifest.check(hashes=True)
        with Pipeline.load(out) as pipe:
            pipe.generate([1], steps=4)
        # the old defaults, or a whole new set from tune (the choice may vary with the machine's load)
        if manifest.defaults_source["tool"] == "tune":
            ClusCaConfig(**manifest.defaults)
            write_defaults(out, ClusCaConfig(**original), {"tool": "test"})
        else:
            assert manifest.defaults == original and manifest.defaults_source == original_source
    # a temporary a kill left before its rename is the next build's to remove (build._remove_debris)
    r = CliRunner().invoke(main, [*BUILD, "--out", str(out)])
    assert r.exit_code == 0 and "up to date" in r.output, r.output
    assert not list(out.glob(f".{MANIFEST}.*"))
    assert Manifest.read(out).defaults == original  # a rebuild that reuses the build keeps its defaults
