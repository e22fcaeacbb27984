"""Issue 20, case 3: everything read from disk is parsed with bounds, and what a graph does at run
time is checked where it runs. A deeply nested JSON (a manifest, a benchmark baseline, a
checkpoint's ``config.json``, a safetensors header) is a one-line error, never a ``RecursionError``
(``generate``, ``inspect [--verify]``, ``build``, ``Pipeline.load``); a graph whose external data
lies outside its own files is refused by ``inspect --verify`` as by ``generate``; a graph with the
right signature but other run-time shapes is a one-line ``EngineError`` in the CLI and the library."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.engines.manifest import Manifest, find_build
from clusca_trt.errors import CheckpointError, ClusCaError, EngineError
from clusca_trt.exporters.build import build_engines
from clusca_trt.hashing import file_sha256
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import OPTIONS, cli_error, copy_engine, edit_manifest, micro_model, one_line

DEPTH = "nested at most 64 levels deep"


def _deep_whole(text: str) -> str:
    return "[" * 100_000 + "]" * 100_000


def _deep_field(text: str) -> str:
    """The manifest with one more key whose value nests 5000 lists deep (valid JSON)."""
    return text.rstrip().rstrip("}") + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}"


DEEP = {"whole-file": _deep_whole, "one-field": _deep_field}


def _deep_manifest(micro, tmp_path, how):
    d = copy_engine(micro[2], tmp_path / "eng")
    (d / "manifest.json").write_text(DEEP[how]((d / "manifest.json").read_text()))
    return d


@pytest.mark.parametrize("how", DEEP)
def test_a_deeply_nested_manifest_is_one_line_in_the_library(micro, tmp_path, how):
    d = _deep_manifest(micro, tmp_path, how)
    for call in (lambda: Pipeline.load(d), lambda: Manifest.read(d), lambda: find_build(d)):
        with pytest.raises(EngineError) as e:
            call()
        assert DEPTH in one_line(e) and "rebuild" in str(e.value)


@pytest.mark.parametrize("how", DEEP)
@pytest.mark.parametrize("command", ["generate", "inspect", "inspect --verify", "flops"])
def test_a_deeply_nested_manifest_is_one_line_in_the_cli(micro, tmp_path, how, command):
    d = _deep_manifest(micro, tmp_path, how)
    args = {"generate": ["generate", str(d), "--steps", "3", "--out", str(tmp_path / "a.npz")]}.get(
        command, [*command.split()[:1], str(d), *command.split()[1:]])
    assert DEPTH in cli_error(CliRunner().invoke(main, ["-q", *args]))


@pytest.mark.parametrize("how", DEEP)
def test_build_rebuilds_over_a_deeply_nested_manifest(micro, fake_export, tmp_path, how):
    d = _deep_manifest(micro, tmp_path, how)
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused
    Pipeline.load(d).generate([1], steps=2)


def test_a_deeply_nested_build_in_a_directory_of_builds_is_one_line(micro, tmp_path):
    root = tmp_path / "builds-of-a-model"
    copy_engine(micro[2], root / "a")
    _deep_manifest(micro, root, "whole-file").rename(root / "b")
    with pytest.raises(EngineError) as e:
        Pipeline.load(root, select={"height": 64})
    assert DEPTH in one_line(e)


def test_a_deeply_nested_baseline_is_one_line(micro, tmp_path):
    baseline = tmp_path / "base.json"
    baseline.write_text('{"a":' * 5000 + "1" + "}" * 5000)
    r = CliRunner().invoke(main, ["-q", "bench", str(micro[2].directory), "--baseline", str(baseline)])
    assert DEPTH in cli_error(r)


def test_a_deeply_nested_checkpoint_config_is_one_line(tmp_path):
    from clusca_trt.models import load_model

    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "DiTTransformer2DModel", "x": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(CheckpointError) as e:
        load_model("dit", checkpoint=folder)
    assert DEPTH in one_line(e)


def test_a_deeply_nested_safetensors_header_is_one_line(tmp_path):
    from clusca_trt.models.checks import check_safetensors_dtypes

    header = ("[" * 5000 + "]" * 5000).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError) as e:
        check_safetensors_dtypes(tmp_path, "model")
    assert DEPTH in one_line(e)


# -- external data ------------------------------------------------------------------------
def _rehash(d):
    """The manifest's sizes and hashes made to match the files there now, and resealed (a forger)."""
    m = Manifest.read(d)

    def edit(data):
        for name, entry in data["graphs"].items():
            for f in entry["files"]:
                p = m.graph_path(name).parent / f["file"]
                f["bytes"], f["sha256"] = p.stat().st_size, file_sha256(p)
        return data

    edit_manifest(d, edit)


def _externalize(d, where):
    """Move the label embedding of ``cond.onnx`` into an external data file at ``where`` (relative
    to the build folder, or absolute), the graph's manifest entry rehashed."""
    import onnx

    path = Manifest.read(d).graph_path("cond")
    model = onnx.load(str(path))
    table = next(t for t in model.graph.initializer if "y_embedder" in t.name)
    target = where if where.startswith("/") else str(path.parent / where)
    with open(target, "wb") as f:
        f.write(table.raw_data)
    length = len(table.raw_data)
    table.ClearField("raw_data")
    table.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", where), ("offset", "0"), ("length", str(length))):
        entry = table.external_data.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    _rehash(d)
    return target


WHERE = {
    "engine-directory": "../../outside.bin",  # beside the manifest: outside its build folder
    "outside-engine": "../../../outside.bin",
    "absolute": "/tmp/clusca-outside-{}.bin",
    "unlisted-in-build": "extra.bin",  # inside the build folder but in no manifest entry: never hashed
}


@pytest.mark.parametrize("where", WHERE)
def test_external_data_outside_the_graph_s_own_files_is_refused(micro, tmp_path, where):
    d = copy_engine(micro[2], tmp_path / "deep" / "eng")
    location = WHERE[where].format(tmp_path.name)
    target = _externalize(d, location)
    try:
        message = f"cond.onnx keeps weights in {location!r}: expected external data only in no file"
        r = CliRunner().invoke(main, ["-q", "inspect", str(d), "--verify"])
        assert message in cli_error(r)
        with pytest.raises(EngineError) as e:
            Pipeline.load(d)
        assert message in one_line(e)
        r = CliRunner().invoke(main, ["-q", "generate", str(d), "--steps", "2", "--out", str(tmp_path / "a.npz")])
        assert "Error:" in cli_error(r) and not (tmp_path / "a.npz").exists()
    finally:
        if location.startswith("/"):
            __import__("os").remove(target)


def test_external_data_in_the_graph_s_own_files_still_loads(micro, tmp_path):
    """What the exporter writes for large graphs: ``<graph>.onnx.data`` beside it, in its manifest entry."""
    d = copy_engine(micro[2], tmp_path / "eng")
    _externalize(d, "cond.onnx.data")

    def add_file(data):
        m = Manifest(data, d)
        p = m.graph_path("cond").parent / "cond.onnx.data"
        data["graphs"]["cond"]["files"].append({"file": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)})
        return data

    edit_manifest(d, add_file)
    r = CliRunner().invoke(main, ["-q", "inspect", str(d), "--verify"])
    assert r.exit_code == 0, r.output
    want = Pipeline.load(micro[2].directory).generate([1], steps=2).latents
    np.testing.assert_array_equal(Pipeline.load(d).generate([1], steps=2).latents, want)


# -- run-time shapes ------------------------------------------------------------------------
def _forge_plain(d):
    """``plain.onnx`` replaced by a graph with its exact signature whose ``out`` is ``x`` itself:
    [2, 4, 8, 8] at run time where [2, 8, 8, 8] is declared (the signature check passes)."""
    import onnx
    from onnx import helper

    path = Manifest.read(d).graph_path("plain")
    real = onnx.load(str(path), load_external_data=False)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "forged",
                              list(real.graph.input), list(real.graph.output))
    forged = helper.make_model(graph, opset_imports=list(real.opset_import))
    forged.ir_version = real.ir_version
    onnx.save(forged, str(path))
    _rehash(d)


def test_a_graph_with_other_run_time_shapes_is_one_line(micro, tmp_path):
    d = copy_engine(micro[2], tmp_path / "eng")
    _forge_plain(d)
    with pytest.raises(EngineError) as e:
        Pipeline.load(d).generate([1], steps=2, method="full")
    assert "graph plain failed in ONNX Runtime" in one_line(e) and "rebuild" in str(e.value)
    r = CliRunner().invoke(main, ["-q", "generate", str(d), "--steps", "2", "--method", "full",
                                  "--out", str(tmp_path / "a.npz")])
    assert "graph plain failed in ONNX Runtime" in cli_error(r) and not (tmp_path / "a.npz").exists()


def test_read_json_bounds_its_size(tmp_path):
    from clusca_trt.files import read_json

    (tmp_path / "a.json").write_text(json.dumps({"a": "x" * 100}))
    assert read_json(tmp_path / "a.json")["a"] == "x" * 100
    with pytest.raises(ValueError, match="expected at most 50 bytes of JSON, got more"):
        read_json(tmp_path / "a.json", max_bytes=50)
    (tmp_path / "b.json").write_text('{"a": "[[[[[[[[", "b": [[1]]}')  # brackets in strings do not nest
    assert read_json(tmp_path / "b.json", max_depth=3) == {"a": "[[[[[[[[", "b": [[1]]}
    with pytest.raises(ValueError, match="expected JSON nested at most 2 levels deep, got deeper"):
        read_json(tmp_path / "b.json", max_depth=2)


def test_every_refusal_here_is_a_clusca_error():
    assert issubclass(EngineError, ClusCaError) and issubclass(CheckpointError, ClusCaError)
