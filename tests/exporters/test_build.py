"""The engine directory: content-keyed reuse, rebuilds, atomic builds, refusal of bad files."""

import json
import os
import shutil

import pytest

from clusca_trt.exporters.build import build_engines
from clusca_trt.engines.manifest import Manifest
from clusca_trt.errors import ConfigError, EngineError
from clusca_trt.models import load_model
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import BuildOptions

OPTS = BuildOptions(batch=1, clusters=2, order=1, kmeans_iterations=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = load_model("dit-tiny", random_init=True, seed=5)
    out = tmp_path_factory.mktemp("b") / "eng"
    build_engines(model, OPTS, out)
    return model, out


def test_rebuild_with_same_inputs_reuses(small):
    model, out = small
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = build_engines(model, OPTS, out)
    assert result.reused
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_changed_inputs_rebuild(small, tmp_path):
    model, out = small
    target = tmp_path / "eng"
    shutil.copytree(out, target)  # the fixture's build, copied: an engine directory may move
    key = Manifest.read(target).key
    assert build_engines(model, OPTS, target).reused
    r = build_engines(model, BuildOptions(batch=1, clusters=3, order=1, kmeans_iterations=2), target)
    assert not r.reused and r.manifest.key != key and r.manifest.spec.options.clusters == 3
    other = load_model("dit-tiny", random_init=True, seed=6)
    r2 = build_engines(other, BuildOptions(batch=1, clusters=3, order=1, kmeans_iterations=2), target)
    assert not r2.reused and r2.manifest.key != r.manifest.key
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no temporary folders left


def test_failed_build_leaves_nothing_and_keeps_previous(small, tmp_path, monkeypatch):
    model, out = small
    target = tmp_path / "eng"
    shutil.copytree(out, target)
    before = sorted(p.name for p in target.iterdir())

    def boom(*a, **k):
        raise RuntimeError("export exploded")

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", boom)
    with pytest.raises(RuntimeError):
        build_engines(model, BuildOptions(batch=1, clusters=3, order=1), target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]
    with pytest.raises(RuntimeError):
        build_engines(model, OPTS, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_k_larger_than_tokens_fails_before_any_work(small, tmp_path):
    model, _ = small
    with pytest.raises(ConfigError, match="clusters must be <= the 64 img tokens, got 65"):
        build_engines(model, BuildOptions(clusters=65), tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


def test_refuses_a_folder_with_other_files(small, tmp_path):
    model, _ = small
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(EngineError, match="expected an empty folder or an engine directory"):
        build_engines(model, OPTS, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "is truncated or changed: expected"),
        ("corrupt", "is corrupt: its sha256 does not match"),
        ("delete", "is missing from"),
        ("manifest", "is not a readable manifest"),
    ],
)
def test_damaged_engine_files_are_refused(small, tmp_path, damage, message):
    _, out = small
    d = _copy(out, tmp_path / "eng")
    f = Manifest.read(d).graph_path("partial")
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        f.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "delete":
        os.remove(f)
    else:
        (d / "manifest.json").write_text("{ not json")
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unverified_corrupt_file_is_still_a_one_line_error(small, tmp_path):
    _, out = small
    d = _copy(out, tmp_path / "eng")
    f = Manifest.read(d).graph_path("full")
    data = bytearray(f.read_bytes())
    data[:64] = b"\x00" * 64
    f.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="full.onnx cannot be read as ONNX"):  # before ONNX Runtime sees it
        Pipeline.load(d, verify=False)


def test_manifest_records_what_was_built(small):
    _, out = small
    data = json.loads((out / "manifest.json").read_text())
    assert data["model"]["source"] == {"kind": "random-init", "seed": 5}
    assert data["build"]["clusters"] == 2
    assert set(data["graphs"]) == {"cond", "plain", "full", "partial", "forecast", "cluster_img", "select_img"}
    assert {"torch", "onnx", "onnxruntime-gpu", "clusca-trt"} <= set(data["versions"])
    for g in data["graphs"].values():
        assert len(g["files"][0]["sha256"]) == 64
