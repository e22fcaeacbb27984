"""Issue 12, case 10: engine directories and outputs get the user's umask; the output location and
the decoder are checked before sampling (a read-only folder or a broken VAE fails in seconds);
a decoder path that is not a local folder never reaches diffusers (no network, ever)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.engines.manifest import Manifest
from clusca_trt.errors import CheckpointError
from clusca_trt.exporters.build import build_engines
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import OPTIONS, cli_error, copy_engine, edit_manifest, micro_model, one_line


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_engine_directories_and_outputs_follow_the_umask(micro, fake_export, tmp_path, mask):
    old = os.umask(mask)
    try:
        d = tmp_path / "eng"
        build_engines(micro_model(), OPTIONS[2], d)
        out = tmp_path / "a.npz"
        r = CliRunner().invoke(main, ["-q", "generate", str(d), "--steps", "3", "--out", str(out)])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    m = Manifest.read(d)
    for folder in (d, m.graph_path("full").parent):
        assert _mode(folder) == 0o777 & ~mask, folder
    for f in (d / "manifest.json", m.graph_path("full"), out):
        assert _mode(f) == 0o666 & ~mask, f


@pytest.fixture
def no_sampling(monkeypatch):
    import clusca_trt.runtime.dit as dit

    def refuse(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(dit, "sample", refuse)


@pytest.mark.parametrize("where", ["under-a-file", "proc", "is-a-folder"])
def test_an_unwritable_output_fails_before_sampling(micro, tmp_path, no_sampling, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = {"under-a-file": blocker / "a.npz", "proc": __import__("pathlib").Path("/proc/clusca-out.npz"),
           "is-a-folder": tmp_path / "dir.npz"}[where]
    if where == "is-a-folder":
        out.mkdir()
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--steps", "3", "--out", str(out)])
    assert "expected" in cli_error(r) and str(out.name) in r.output


def test_png_output_without_a_decoder_fails_before_sampling(micro, tmp_path, no_sampling):
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--out", str(tmp_path / "a.png")])
    assert "expected a model with a decoder" in cli_error(r)


def _with_decoder(micro, tmp_path, decoder):
    d = copy_engine(micro[2], tmp_path / "eng")
    edit_manifest(d, lambda data: dict(data, decoder=decoder))
    return d


def test_a_missing_vae_fails_before_sampling(micro, tmp_path, no_sampling):
    d = _with_decoder(micro, tmp_path, {"kind": "vae", "path": str(tmp_path / "gone" / "vae")})
    with pytest.raises(CheckpointError) as e:
        Pipeline.load(d).generate([1], steps=3)
    assert "expected the vae folder (config.json) the engines were built with" in one_line(e)
    r = CliRunner().invoke(main, ["-q", "generate", str(d), "--steps", "3", "--out", str(tmp_path / "a.npz")])
    assert "expected the vae folder" in cli_error(r) and not (tmp_path / "a.npz").exists()


def test_a_broken_vae_fails_before_sampling(micro, tmp_path, no_sampling):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{broken")
    d = _with_decoder(micro, tmp_path, {"kind": "vae", "path": str(vae)})
    with pytest.raises(CheckpointError) as e:
        Pipeline.load(d).generate([1], steps=3)
    assert "cannot load the VAE at" in one_line(e)


def test_diffusers_is_only_asked_for_local_folders(micro, tmp_path, no_sampling, monkeypatch):
    import diffusers

    from clusca_trt.runtime import decode

    asked = []

    def from_pretrained(path, **kwargs):
        asked.append(kwargs)
        raise OSError("stop here")

    decode._vae.cache_clear()
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", from_pretrained)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    d = _with_decoder(micro, tmp_path, {"kind": "vae", "path": str(vae)})
    with pytest.raises(CheckpointError):
        Pipeline.load(d).generate([1], steps=3)
    decode._vae.cache_clear()
    assert asked and all(k.get("local_files_only") is True for k in asked)


def test_a_good_run_still_writes_its_file(micro, tmp_path):
    out = tmp_path / "sub" / "a.npz"
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert np.isfinite(np.load(out)["latents"]).all()
    assert [p.name for p in out.parent.iterdir()] == ["a.npz"]  # no probe or temporary file left
