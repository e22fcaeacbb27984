"""Issue 12, case 5: a malformed manifest is one ``EngineError`` line in ``Pipeline.load``,
``generate`` and ``inspect``; ``build`` rebuilds over it (no traceback). Paths in a manifest stay
inside the engine directory."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.engines.manifest import FORMAT
from clusca_trt.errors import EngineError
from clusca_trt.exporters.build import build_engines
from clusca_trt.runtime.pipeline import Pipeline


from .conftest import OPTIONS, cli_error, copy_engine, drop_key, micro_model, one_line, set_key, write_sealed


def _build_dir_of(d):
    return d["build_dir"]


CASES = {
    "format-only": (lambda d: {"format": d["format"]}, "expected manifest.key, got none"),
    "json-list": (lambda d: [d], "expected a JSON object, got a list"),
    "json-null": (lambda d: None, "expected a JSON object, got null"),
    "json-number": (lambda d: 3, "expected a JSON object, got an integer"),
    "old-format": (set_key(1, "format"), f"expected engine format {FORMAT}"),
    "unknown-default": (set_key(9, "defaults", "speed"), "expected defaults keys among interval, clusters"),
    "bad-default": (set_key(0, "defaults", "interval"), "defaults: interval must be an integer >= 1, got 0"),
    "graph-removed": (drop_key("graphs", "partial"), "expected graphs cond, plain, full, forecast, partial"),
    "spec-field-removed": (drop_key("spec", "slots"), "expected spec.slots, got none"),
    "spec-field-wrong-type": (set_key("64", "spec", "slots", 0, "tokens"), "expected spec.slots[0].tokens to be an integer"),
    "spec-edited": (set_key([2, 4, 8, 9], "spec", "graphs", "full", "outputs", 0, "shape"),
                    "expected spec to be the spec its options and shapes make"),
    "build-mismatch": (set_key(3, "build", "clusters"), "expected build to equal spec.options"),
    "model-missing": (drop_key("model"), "expected manifest.model, got none"),
    "source-kind-missing": (drop_key("model", "source", "kind"), "expected model.source.kind, got none"),
    "sampling-missing": (drop_key("model", "sampling", "num_classes"), "expected model.sampling.num_classes, got none"),
    "family-unknown": (set_key("unet", "model", "family"), "expected model.family to be one of dit, flux, hunyuan-video"),
    "hash-not-hex": (set_key("zz", "graphs", "full", "files", 0, "sha256"), "sha256 to be 64 hex digits"),
    "bytes-wrong-type": (set_key("10", "graphs", "full", "files", 0, "bytes"), "bytes to be an integer"),
    "absolute-graph-path": (set_key("/etc/passwd", "graphs", "full", "file"), "graphs.full.file to be a file name inside"),
    "parent-graph-path": (set_key("../../x.onnx", "graphs", "full", "files", 0, "file"), "to be a file name inside"),
    "absolute-build-dir": (set_key("/tmp", "build_dir"), "expected build_dir to be builds/<name>"),
    "parent-build-dir": (set_key(".builds/../..", "build_dir"), "expected build_dir to be builds/<name>"),
    "relative-decoder": (set_key({"kind": "vae", "path": "vae"}, "decoder"), "expected decoder.path to be an absolute"),
    "decoder-kind": (set_key({"kind": "gan"}, "decoder"), "expected decoder.kind to be one of pixels, vae, video-vae"),
    "plan-outside": (set_key({"key": "k", "platform": {}, "options": {}, "plans": {"full": {
        "file": "../full.plan", "files": [{"file": "../full.plan", "bytes": 1, "sha256": "0" * 64}]}}}, "tensorrt"),
        "tensorrt.plans.full.file to be a file name inside"),
    "versions-wrong": (set_key({"torch": 2}, "versions"), "expected versions to map names to version strings"),
}


def _damaged(micro, tmp_path, case):
    d = copy_engine(micro[2], tmp_path / "eng")
    edit, message = CASES[case]
    data = json.loads((d / "manifest.json").read_text())
    write_sealed(d, edit(data))  # resealed: the schema, not the digest, must refuse these
    return d, message


@pytest.mark.parametrize("case", CASES)
def test_pipeline_load_refuses_a_malformed_manifest_in_one_line(micro, tmp_path, case):
    d, message = _damaged(micro, tmp_path, case)
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert message in one_line(e) and "rebuild" in str(e.value)


@pytest.mark.parametrize("case", ["format-only", "json-list", "unknown-default", "graph-removed", "spec-field-removed",
                                  "spec-field-wrong-type", "relative-decoder"])
@pytest.mark.parametrize("command", ["generate", "inspect", "inspect --verify", "inspect --json"])
def test_cli_refuses_a_malformed_manifest_in_one_line(micro, tmp_path, case, command):
    d, message = _damaged(micro, tmp_path, case)
    args = {"generate": ["generate", str(d), "--steps", "3", "--out", str(tmp_path / "a.npz")]}.get(
        command, [*command.split()[:1], str(d), *command.split()[1:]])
    r = CliRunner().invoke(main, ["-q", *args])
    assert message in cli_error(r)
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.parametrize("case", ["json-list", "json-null", "format-only", "spec-field-removed", "absolute-build-dir"])
def test_build_rebuilds_over_a_malformed_manifest(micro, fake_export, tmp_path, case):
    d, _ = _damaged(micro, tmp_path, case)
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused
    Pipeline.load(d)
