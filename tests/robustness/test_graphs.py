"""Issue 12, case 6: each graph file is held to the manifest's spec at load (names, static shapes,
dtypes of its inputs and outputs), even when its hash was updated to match: swapped graphs or a
graph of another build are refused in one line, ``inspect --verify`` fails, ``build`` rebuilds."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.engines.manifest import Manifest
from clusca_trt.errors import EngineError
from clusca_trt.exporters.build import build_engines
from clusca_trt.hashing import file_sha256
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import OPTIONS, cli_error, copy_engine, micro_model, one_line, write_sealed


def _rehash(d):
    """Make the manifest's sizes and hashes match whatever files are there now (a careful forger)."""
    m = Manifest.read(d)
    data = json.loads((d / "manifest.json").read_text())
    for name, entry in data["graphs"].items():
        for f in entry["files"]:
            p = m.graph_path(name).parent / f["file"]
            f["bytes"], f["sha256"] = p.stat().st_size, file_sha256(p)
    write_sealed(d, data)


def _swap(d, a, b):
    m = Manifest.read(d)
    pa, pb = m.graph_path(a), m.graph_path(b)
    tmp = pa.with_name("swap.tmp")
    pa.rename(tmp), pb.rename(pa), tmp.rename(pb)
    _rehash(d)


DAMAGE = {
    "full<->partial": lambda micro, d: _swap(d, "full", "partial"),
    "cluster<->select": lambda micro, d: _swap(d, "cluster_img", "select_img"),
    "forecast<->full": lambda micro, d: _swap(d, "forecast", "full"),
    "partial-of-K3": lambda micro, d: (shutil.copyfile(micro[3].graph_path("partial"),
                                                       Manifest.read(d).graph_path("partial")), _rehash(d)),
    "cluster-of-K3": lambda micro, d: (shutil.copyfile(micro[3].graph_path("cluster_img"),
                                                       Manifest.read(d).graph_path("cluster_img")), _rehash(d)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_graph_that_is_not_the_spec_is_refused_at_load(micro, tmp_path, damage):
    d = copy_engine(micro[2], tmp_path / "eng")
    DAMAGE[damage](micro, d)
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert "graph of this build: expected" in one_line(e) and "rebuild" in str(e.value)
    r = CliRunner().invoke(main, ["-q", "inspect", str(d), "--verify"])
    assert "graph of this build" in cli_error(r)


@pytest.mark.parametrize("damage", ["full<->partial", "partial-of-K3"])
def test_build_does_not_call_swapped_graphs_up_to_date(micro, fake_export, tmp_path, damage):
    d = copy_engine(micro[2], tmp_path / "eng")
    DAMAGE[damage](micro, d)
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused
    Pipeline.load(d).generate([1], steps=4)


def test_a_file_that_is_not_onnx_is_refused_before_onnx_runtime(micro, tmp_path):
    d = copy_engine(micro[2], tmp_path / "eng")
    Manifest.read(d).graph_path("select_img").write_bytes(b"not a graph at all")
    _rehash(d)
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert "select_img.onnx cannot be read as ONNX" in one_line(e)
