"""Fixtures of the robustness tests: a micro DiT (64 tokens, 2 blocks of width 32) built once for
K=2 and K=3, copies of those engine directories to damage, and an ``export_all`` that copies the
prebuilt graph files (so a test can rebuild a directory in milliseconds; the build around the
export is the real one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clusca_trt.models import LoadedModel
from clusca_trt.models.dit import DiT, DiTAdapter, DiTConfig, init_random
from clusca_trt.spec import BuildOptions

MICRO = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
# the same in pixel space: one grey channel, decoded by {"kind": "pixels"} (a .png can be written)
MICRO_PIXELS = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4,
                         num_classes=10, learn_sigma=False)
OPTIONS = {k: BuildOptions(batch=1, clusters=k, order=1, kmeans_iterations=2) for k in (2, 3)}


def micro_model(seed: int = 0) -> LoadedModel:
    """The micro DiT with random weights (seed), as ``load_model`` would return it."""
    return LoadedModel("dit-tiny", "dit", DiTAdapter(init_random(DiT(MICRO), seed)), MICRO.to_dict(),
                       {"kind": "random-init", "seed": seed})


TINY_OPTIONS = BuildOptions(batch=1, clusters=2, order=1, kmeans_iterations=2)
TINY_BUILD_FLAGS = ["--model", "dit-tiny", "--random-init", "-K", "2", "-O", "1", "--kmeans-iterations", "2"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The Manifest of the named ``dit-tiny`` (random weights, seed 0) built for K=2, O=1: a model the
    torch backend loads by its name (``clusca-trt build`` with ``TINY_BUILD_FLAGS`` makes the same)."""
    from clusca_trt.exporters.build import build_engines
    from clusca_trt.models import load_model

    model = load_model("dit-tiny", random_init=True, seed=0)
    return build_engines(model, TINY_OPTIONS, tmp_path_factory.mktemp("tiny") / "eng").manifest


@pytest.fixture(scope="session")
def micro_pixels(tmp_path_factory):
    """The Manifest of the pixel-space micro DiT's engines (K=2), with a pixels decoder."""
    from clusca_trt.exporters.build import build_engines

    model = LoadedModel("dit-digits", "dit", DiTAdapter(init_random(DiT(MICRO_PIXELS), 0)), MICRO_PIXELS.to_dict(),
                        {"kind": "random-init", "seed": 0}, decoder={"kind": "pixels"})
    return build_engines(model, OPTIONS[2], tmp_path_factory.mktemp("micro-pixels") / "k2").manifest


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """{K: Manifest} of the micro DiT's engines for K=2 and K=3."""
    from clusca_trt.exporters.build import build_engines

    root = tmp_path_factory.mktemp("micro")
    model = micro_model()
    return {k: build_engines(model, o, root / f"k{k}").manifest for k, o in OPTIONS.items()}


def write_sealed(directory: Path, data) -> None:
    """Write ``data`` as ``DIR/manifest.json`` the way a careful forger would: with its digest
    recomputed (the digest is unkeyed), so that the checks behind it are what must refuse it. A
    value that is not an object is written as it is."""
    try:
        from clusca_trt.engines.manifest import DIGEST, manifest_digest
    except ImportError:  # the code before manifests were sealed (measuring what failed before)
        DIGEST, manifest_digest = "digest", None
    if isinstance(data, dict) and manifest_digest is not None:
        data = dict({k: v for k, v in data.items() if k != DIGEST}, **{DIGEST: manifest_digest(data)})
    (Path(directory) / "manifest.json").write_text(json.dumps(data))


def set_key(value, *keys):
    """An edit for ``edit_manifest``: ``d[k0][k1]...[kn] = value``."""
    def edit(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return d

    return edit


def drop_key(*keys):
    """An edit for ``edit_manifest``: ``del d[k0][k1]...[kn]``."""
    def edit(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
        return d

    return edit


def edit_manifest(directory: Path, edit, seal: bool = True) -> None:
    """``edit(data)`` (returning the new data) on ``DIR/manifest.json``; resealed unless ``seal`` is False."""
    data = edit(json.loads((Path(directory) / "manifest.json").read_text()))
    if seal:
        write_sealed(directory, data)
    else:
        (Path(directory) / "manifest.json").write_text(json.dumps(data))


def copy_engine(manifest, dst: Path) -> Path:
    shutil.copytree(manifest.directory, dst)
    return dst


def copy_graphs(source, out_dir: Path) -> dict[str, Path]:
    """The graph files of the engines ``source`` (a Manifest) copied into ``out_dir``."""
    paths = {}
    for name, path in source.graph_paths().items():
        for f in source.data["graphs"][name]["files"]:
            shutil.copyfile(path.parent / f["file"], Path(out_dir) / f["file"])
        paths[name] = Path(out_dir) / path.name
    return paths


@pytest.fixture
def fake_export(micro, monkeypatch):
    """``export_all`` replaced by a copy of the prebuilt graph files of the same K."""

    def export(adapter, spec, out_dir):
        return copy_graphs(micro[spec.options.clusters], out_dir)

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", export)
    return export


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text and text, text
    return text


def cli_error(result) -> str:
    """The one ``Error:`` line of a failed CLI run (and no traceback)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]
