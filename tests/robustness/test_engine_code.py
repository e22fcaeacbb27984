"""Issue 20, case 1: an engine directory is data, never code. Whatever a manifest names as the
model's ``loader`` (a standard-library function that runs programs or deletes files, a third-party
function, a module outside the package that acts when imported, one of our own functions that is
not a loader), opening it with ``--backend torch`` imports and calls none of it: the model is loaded
by the build's family from the package's own registry, and the run works, through the CLI and the
library alike. The manifests here are resealed (a careful forger); a hand edit that is not is
refused by its digest (``test_sealed_manifests``)."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.errors import EngineError
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import cli_error, copy_engine, edit_manifest, one_line

OUTSIDE = "clusca_probe_outside_module"  # written by the test into a folder on sys.path
# loader -> what it is
LOADERS = {
    "subprocess:run": "stdlib: runs a program (the model's keys as its arguments)",
    "os:system": "stdlib: runs a shell command",
    "shutil:rmtree": "stdlib: deletes a folder",
    "builtins:print": "stdlib: ran before (issue 20)",
    "os:getcwd": "stdlib: ran before (issue 20)",
    "numpy:save": "third-party: writes a file",
    "click.testing:CliRunner": "third-party: a class",
    f"{OUTSIDE}:load": "outside the package: writes a file when imported",
    "clusca_trt.exporters.build:build_engines": "ours, not a loader: builds engines",
    "clusca_trt.files:write_text_atomic": "ours, not a loader: writes a file",
}


class Traps:
    """Every function named in ``LOADERS`` wrapped, while ``armed``, by one that records a call with
    a manifest's model entry as an argument (how a loader is called) and then fails; other calls
    (our own code's ``os.getcwd``, say) go through. The module outside the package is importable:
    importing it writes ``marker``."""

    def __init__(self, tmp_path, monkeypatch):
        self.calls, self.monkeypatch = [], monkeypatch
        self.marker = tmp_path / "imported.txt"
        folder = tmp_path / "site"
        folder.mkdir()
        (folder / f"{OUTSIDE}.py").write_text(
            f"open({str(self.marker)!r}, 'w').write('imported')\n"
            "def load(model):\n"
            f"    open({str(self.marker)!r}, 'a').write(' and called')\n"
        )
        monkeypatch.syspath_prepend(str(folder))

    @contextlib.contextmanager
    def armed(self):
        with self.monkeypatch.context() as m:
            for loader in LOADERS:
                module, _, function = loader.partition(":")
                if module == OUTSIDE:
                    continue
                mod = importlib.import_module(module)
                real = getattr(mod, function)

                def trap(*args, _loader=loader, _real=real, **kwargs):
                    if any(isinstance(a, dict) and "family" in a for a in (*args, *kwargs.values())):
                        self.calls.append(_loader)
                        raise AssertionError(f"{_loader} was called with a manifest's model entry")
                    return _real(*args, **kwargs)

                m.setattr(mod, function, trap)
            yield


@pytest.fixture
def traps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where subprocess:run would have made its files
    yield Traps(tmp_path, monkeypatch)
    sys.modules.pop(OUTSIDE, None)


def _with_loader(tiny, tmp_path, loader):
    """A copy of the dit-tiny engines whose manifest names ``loader`` (and, for ``subprocess:run``,
    a first key ``touch``, as in the issue's probe), resealed."""
    d = copy_engine(tiny, tmp_path / "eng")

    def edit(data):
        model = {"touch": "1", **data["model"], "loader": loader}
        return dict(data, model=model)

    edit_manifest(d, edit)
    return d


def _nothing_ran(traps, tmp_path, before):
    assert traps.calls == []
    assert not traps.marker.exists() and OUTSIDE not in sys.modules
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no file named after a manifest key


@pytest.fixture(scope="module")
def want(tiny):
    """What the torch backend samples from an untouched build."""
    with Pipeline.load(tiny.directory, backend="torch") as pipe:
        return pipe.generate([1], steps=3, seed=2).latents


@pytest.mark.parametrize("loader", LOADERS)
def test_the_library_never_imports_or_calls_what_a_manifest_names(tiny, want, tmp_path, traps, loader):
    d = _with_loader(tiny, tmp_path, loader)
    before = sorted(p.name for p in tmp_path.iterdir())
    with traps.armed(), Pipeline.load(d, backend="torch") as pipe:
        got = pipe.generate([1], steps=3, seed=2).latents
    _nothing_ran(traps, tmp_path, before)
    np.testing.assert_array_equal(got, want)  # the same model as an untouched build's


@pytest.mark.parametrize("loader", ["subprocess:run", "os:system", f"{OUTSIDE}:load",
                                    "clusca_trt.exporters.build:build_engines"])
def test_the_cli_never_imports_or_calls_what_a_manifest_names(tiny, tmp_path, traps, loader):
    d = _with_loader(tiny, tmp_path, loader)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out" / "a.npz"
    with traps.armed():
        r = CliRunner().invoke(main, ["-q", "generate", str(d), "--backend", "torch", "--steps", "3", "--out",
                                      str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    out.unlink(), out.parent.rmdir()
    _nothing_ran(traps, tmp_path, before)


def test_a_model_that_is_not_the_one_built_is_a_one_line_error(micro, tmp_path, traps):
    """The micro DiT is named dit-tiny but has its own architecture: the registry's dit-tiny is not
    the model its graphs were exported from, so the torch backend refuses it (before: a traceback
    part-way through the first step)."""
    with traps.armed(), pytest.raises(EngineError) as e:
        Pipeline.load(micro[2].directory, backend="torch")
    assert "expected model dit-tiny with the architecture the engines were built from" in one_line(e)
    with traps.armed():
        r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--backend", "torch", "--steps",
                                      "2", "--out", str(tmp_path / "a.npz")])
    assert "with the architecture the engines were built from" in cli_error(r)
    assert traps.calls == [] and not (tmp_path / "a.npz").exists()


def test_manifests_written_by_build_name_no_code(tiny):
    data = json.loads((tiny.directory / "manifest.json").read_text())
    text = json.dumps(data)
    assert "loader" not in data["model"] and "clusca_trt.models" not in text
