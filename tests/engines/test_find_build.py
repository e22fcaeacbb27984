"""Choosing one build in a directory of builds (FLUX: one per resolution) by its build options."""

import json

import pytest

from clusca_trt.engines.manifest import FORMAT, MANIFEST, find_build
from clusca_trt.errors import EngineError, EngineMismatchError


def _fake_build(folder, **options):
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "model": {"options": options}}))
    return folder


@pytest.fixture
def root(tmp_path):
    _fake_build(tmp_path / "flux" / "1024x1024", height=1024, width=1024, text_length=512)
    _fake_build(tmp_path / "flux" / "768x1360", height=768, width=1360, text_length=512)
    (tmp_path / "flux" / "notes").mkdir()  # not a build: ignored
    return tmp_path / "flux"


@pytest.mark.parametrize(
    "select, want",
    [
        ({"height": 768}, "768x1360"),
        ({"height": 1024, "width": 1024}, "1024x1024"),
        ({"width": 1360, "height": None}, "768x1360"),
    ],
)
def test_selection_picks_the_matching_build(root, select, want):
    assert find_build(root, select) == root / want


def test_a_single_build_needs_no_selection(root, tmp_path):
    assert find_build(root / "1024x1024") == root / "1024x1024"
    lone = _fake_build(tmp_path / "one" / "512x512", height=512, width=512).parent
    assert find_build(lone) == lone / "512x512"


@pytest.mark.parametrize(
    "directory, select, error, message",
    [
        ("", None, EngineError, "holds builds 1024x1024, 768x1360: expected a choice of height, width, got none"),
        ("", {"height": 512}, EngineMismatchError, "holds builds 1024x1024, 768x1360, none for height=512"),
        ("1024x1024", {"height": 768}, EngineMismatchError, "were built for height=1024, requested height=768"),
        ("notes", None, EngineError, "expected an engine directory with manifest.json"),
    ],
)
def test_bad_selections(root, directory, select, error, message):
    with pytest.raises(error) as e:
        find_build(root / directory, select)
    assert message in str(e.value) and "\n" not in str(e.value)
