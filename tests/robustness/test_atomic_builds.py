"""Issue 12, cases 2 and 9: loading never mixes builds, builds of one directory take turns, a
killed build leaves a usable engine and no debris after the next build, user files survive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import clusca_trt
from clusca_trt.engines.manifest import FORMAT, Manifest
from clusca_trt.errors import EngineError
from clusca_trt.exporters.build import build_engines
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import OPTIONS, copy_engine, micro_model, one_line

PACKAGE_ROOT = Path(clusca_trt.__file__).resolve().parents[1]
TESTS_ROOT = Path(__file__).resolve().parents[2]


def _fresh_k(pipe) -> int:
    """K as the loaded partial and cluster sessions see it (not as the manifest says)."""
    partial = {i.name: i.shape for i in pipe.engine.sessions["partial"].get_inputs()}
    cluster = {i.name: i.shape for i in pipe.engine.sessions["cluster_img"].get_inputs()}
    assert partial["fresh_img"][-1] == cluster["centroids_img"][1]
    return partial["fresh_img"][-1]


def test_a_load_during_a_rebuild_never_mixes_builds(micro, fake_export, tmp_path, monkeypatch):
    import clusca_trt.engines.ort as ort_mod

    d = copy_engine(micro[2], tmp_path / "eng")
    real = ort_mod.OrtEngine._session
    rebuilt = []

    def session(self, name, path, *args):
        s = real(self, name, path, *args)
        if name == "full" and not rebuilt:  # a rebuild (K=3) lands right after the full graph loaded
            rebuilt.append(build_engines(micro_model(), OPTIONS[3], d, force=True))
        return s

    monkeypatch.setattr(ort_mod.OrtEngine, "_session", session)
    pipe = Pipeline.load(d)
    assert rebuilt
    assert _fresh_k(pipe) == pipe.spec.options.clusters  # every session from the build the manifest named
    assert np.isfinite(pipe.generate([1], steps=8).latents).all()
    monkeypatch.undo()
    assert _fresh_k(Pipeline.load(d)) == 3  # the next load gets the new build


def test_a_reader_whose_build_was_removed_retries_from_a_fresh_manifest(micro, tmp_path):
    import shutil

    from clusca_trt.engines.manifest import read_build, replace_manifest

    d = copy_engine(micro[2], tmp_path / "eng")
    calls = []

    def use(manifest):
        calls.append(manifest.data["build_dir"])
        if len(calls) == 1:  # two rebuilds happen meanwhile: our build folder is gone
            data = json.loads((d / "manifest.json").read_text())
            new = manifest.build_dir.with_name(manifest.build_dir.name + "-next")
            shutil.copytree(manifest.build_dir, new)
            data["build_dir"] = f"builds/{new.name}"
            replace_manifest(d, data)
            shutil.rmtree(manifest.build_dir)
        manifest.check(hashes=True)
        return manifest

    got = read_build(d, use)
    assert len(calls) == 2 and got.data["build_dir"].endswith("-next")


def test_two_builds_of_one_directory_take_turns(micro, fake_export, tmp_path, monkeypatch):
    d = tmp_path / "eng"
    spans, errors = [], []

    def slow_export(adapter, spec, out_dir):
        t0 = time.monotonic()
        time.sleep(0.4)
        paths = fake_export(adapter, spec, out_dir)
        spans.append((t0, time.monotonic()))
        return paths

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", slow_export)

    def build(k):
        try:
            build_engines(micro_model(), OPTIONS[k], d, force=True)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(k,)) for k in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, "the two exports overlapped"
    Pipeline.load(d)  # a consistent engine
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]


def _run_killed_build(engine_dir: Path, source: Path, kill_at: str) -> int:
    """A build of ``engine_dir`` (K=3, its graph files copied from ``source``) in a subprocess that
    SIGKILLs itself at ``kill_at``: "export" (part-way through the export), "rename-0" (just before
    the build's first ``os.replace``) or "rename-N" (just after its N-th); returns its exit status
    (a build with fewer renames finishes: 0)."""
    script = textwrap.dedent(f"""
        import os, shutil, signal, sys
        sys.path[:0] = [{str(PACKAGE_ROOT)!r}, {str(TESTS_ROOT)!r}]
        from pathlib import Path
        import clusca_trt.exporters.build as b
        from clusca_trt.engines.manifest import Manifest
        from tests.robustness.conftest import OPTIONS, copy_graphs, micro_model

        kill_at = {kill_at!r}
        def export(adapter, spec, out_dir):
            if kill_at == "export":
                (Path(out_dir) / "full.onnx").write_bytes(b"half-written")
                os.kill(os.getpid(), signal.SIGKILL)
            return copy_graphs(Manifest.read(Path({str(source)!r})), out_dir)
        b.export_all = export
        real, done = os.replace, []
        def replace(a, c):
            if kill_at == "rename-0":
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, c)
            done.append(c)
            if kill_at == f"rename-{{len(done)}}":
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        b.build_engines(micro_model(), OPTIONS[3], Path({str(engine_dir)!r}), force=True)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120).returncode


@pytest.mark.parametrize("kill_at", ["export", "rename-0", "rename-1", "rename-2", "rename-3"])
def test_a_killed_build_leaves_an_engine_and_the_next_build_removes_its_debris(micro, fake_export, tmp_path,
                                                                               kill_at):
    d = copy_engine(micro[2], tmp_path / "eng")
    assert _run_killed_build(d, micro[3].directory, kill_at) in (0, -signal.SIGKILL)
    pipe = Pipeline.load(d)  # an engine is there, whichever build it is
    assert pipe.spec.options.clusters in (2, 3) and _fresh_k(pipe) == pipe.spec.options.clusters
    build_engines(micro_model(), OPTIONS[pipe.spec.options.clusters], d)  # up to date: reused, debris gone
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no temporary siblings
    manifest = Manifest.read(d)
    named = {Path(manifest.data["build_dir"]).name, Path(manifest.data.get("previous") or "-").name}
    left = {p.name for p in (d / "builds").iterdir()}
    assert left <= named, f"unreferenced build folders left: {left - named}"
    assert not list(d.glob(".manifest.json.*"))


def test_a_rebuild_keeps_what_a_user_put_in_the_engine_directory(micro, fake_export, tmp_path):
    d = copy_engine(micro[2], tmp_path / "eng")
    (d / "notes.txt").write_text("mine")
    (d / "mine").mkdir()
    (d / "mine" / "data.bin").write_bytes(b"\x00\x01")
    r = build_engines(micro_model(), OPTIONS[3], d)
    assert not r.reused and Manifest.read(d).spec.options.clusters == 3
    assert (d / "notes.txt").read_text() == "mine" and (d / "mine" / "data.bin").read_bytes() == b"\x00\x01"


def test_builds_beyond_the_previous_one_are_removed(micro, fake_export, tmp_path):
    d = copy_engine(micro[2], tmp_path / "eng")
    for k in (3, 2, 3):
        build_engines(micro_model(), OPTIONS[k], d, force=True)
    manifest = Manifest.read(d)
    assert len(list((d / "builds").iterdir())) == 2  # the current build and the one before it
    assert manifest.build_dir.is_dir() and (d / manifest.data["previous"]).is_dir()


def test_an_engine_directory_of_the_earlier_layout_is_refused_and_rebuilt(micro, fake_export, tmp_path):
    d = tmp_path / "eng"
    d.mkdir()
    m = micro[2]
    data = dict(m.data, format=1)
    data.pop("build_dir"), data.pop("previous", None)
    for name, path in m.graph_paths().items():  # the graph files beside the manifest, as format 1 had them
        (d / path.name).write_bytes(path.read_bytes())
    (d / "manifest.json").write_text(json.dumps(data))
    (d / "notes.txt").write_text("mine")
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert f"expected engine format {FORMAT}" in one_line(e) and "rebuild" in str(e.value)
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused
    Pipeline.load(d)
    assert sorted(p.name for p in d.iterdir()) == [".lock", "builds", "manifest.json", "notes.txt"]


def test_a_failed_first_build_leaves_no_directory(micro, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("export exploded")

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", boom)
    with pytest.raises(RuntimeError):
        build_engines(micro_model(), OPTIONS[2], tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []
