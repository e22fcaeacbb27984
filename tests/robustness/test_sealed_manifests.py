"""Issue 20, case 2: what ``build`` wrote is what ``load`` accepts. A manifest edited after it was
written is refused in one line (its digest no longer matches) and ``build`` rebuilds over it
instead of calling it up to date; a forger who also recomputes the (unkeyed) digest is stopped by
the checks of the manifest's claims against the graphs it describes: the class count against the
label embedding, the latent shape against the ``x`` input, the decoder against the channels and
the family (FLUX: its latent size, tokens and text facts against its inputs). Issue 19: build
folders are visible (``builds/``), a directory of the hidden ``.builds/`` layout is refused with
"rebuild" and migrated by ``build``, and ``inspect`` prints the path of every graph file."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.engines.manifest import FORMAT, Manifest, build_lock, replace_manifest
from clusca_trt.engines.schema import check_manifest
from clusca_trt.errors import EngineError
from clusca_trt.exporters.build import build_engines
from clusca_trt.runtime.pipeline import Pipeline

from .conftest import (OPTIONS, TINY_BUILD_FLAGS, cli_error, copy_engine, copy_graphs, drop_key, edit_manifest,
                       micro_model, one_line, set_key)


def _both(*edits):
    def edit(d):
        for e in edits:
            d = e(d)
        return d

    return edit


CHANGED = "was changed after clusca-trt wrote it"
# a hand edit (the digest left as it was) -> what refuses it
HAND_EDITS = {
    "num-classes": (set_key(1000, "model", "sampling", "num_classes"), CHANGED),
    "decoder-pixels": (set_key({"kind": "pixels"}, "decoder"), CHANGED),
    "latent-shape": (set_key([4, 100000, 100000], "model", "sampling", "latent_shape"), CHANGED),
    "default-interval": (set_key(3, "defaults", "interval"), CHANGED),
    "digest-garbage": (set_key("0" * 64, "digest"), CHANGED),
    "digest-removed": (drop_key("digest"), "is not sealed: expected its digest, got none"),
}


def _hand_edited(micro, tmp_path, case):
    d = copy_engine(micro[2], tmp_path / "eng")
    edit, message = HAND_EDITS[case]
    edit_manifest(d, edit, seal=False)
    return d, message


@pytest.mark.parametrize("case", HAND_EDITS)
def test_a_hand_edited_manifest_is_refused_in_one_line(micro, tmp_path, case):
    d, message = _hand_edited(micro, tmp_path, case)
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert message in one_line(e) and "rebuild with clusca-trt build" in str(e.value)
    for command in (["generate", str(d), "--steps", "3", "--out", str(tmp_path / "a.npz")],
                    ["inspect", str(d)], ["inspect", str(d), "--verify"]):
        assert message in cli_error(CliRunner().invoke(main, ["-q", *command]))
    assert not (tmp_path / "a.npz").exists()


def test_a_manifest_reformatted_but_not_changed_is_accepted(micro, tmp_path):
    """The digest covers the content (canonical JSON), not the bytes: indentation and key order are free."""
    d = copy_engine(micro[2], tmp_path / "eng")
    data = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(dict(reversed(list(data.items()))), indent=7))
    Pipeline.load(d).generate([1], steps=2)


@pytest.mark.parametrize("case", ["num-classes", "decoder-pixels", "default-interval", "digest-removed"])
def test_build_rebuilds_over_a_hand_edited_manifest(micro, fake_export, tmp_path, case):
    d, _ = _hand_edited(micro, tmp_path, case)
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused
    assert r.manifest.model["sampling"]["num_classes"] == 10 and r.manifest.data["decoder"] is None
    Pipeline.load(d).generate([1], steps=2)


def test_cli_build_does_not_call_an_edited_manifest_up_to_date(tiny, tmp_path, monkeypatch):
    d = copy_engine(tiny, tmp_path / "eng")
    r = CliRunner().invoke(main, ["-q", "build", *TINY_BUILD_FLAGS, "--out", str(d)])
    assert r.exit_code == 0 and "up to date" in r.output, r.output  # the same inputs: reused
    edit_manifest(d, set_key(1000, "model", "sampling", "num_classes"), seal=False)
    monkeypatch.setattr("clusca_trt.exporters.build.export_all", lambda adapter, spec, out: copy_graphs(tiny, out))
    r = CliRunner().invoke(main, ["-q", "build", *TINY_BUILD_FLAGS, "--out", str(d)])
    assert r.exit_code == 0 and ": built (" in r.output, r.output
    assert Manifest.read(d).model["sampling"]["num_classes"] == 10


# a forged manifest (edited, then its digest recomputed) -> the check that refuses it
FORGED = {
    "num-classes-1000": (_both(set_key(1000, "model", "sampling", "num_classes"),
                               set_key(1000, "model", "config", "num_classes")),
                         "cond.onnx embeds 10 classes (and the null class): expected model.sampling.num_classes 10, "
                         "got 1000"),
    "num-classes-5": (_both(set_key(5, "model", "sampling", "num_classes"), set_key(5, "model", "config", "num_classes")),
                      "cond.onnx embeds 10 classes"),
    "num-classes-vs-config": (set_key(1000, "model", "sampling", "num_classes"),
                              "expected model.sampling.num_classes to equal model.config.num_classes 10, got 1000"),
    "latent-shape": (set_key([4, 100000, 100000], "model", "sampling", "latent_shape"),
                     "expected model.sampling.latent_shape to be [4, 8, 8] (the x input's shape per sample)"),
    "latent-channels": (set_key([3, 8, 8], "model", "sampling", "latent_shape"),
                        "expected model.sampling.latent_shape to be [4, 8, 8]"),
    "decoder-pixels": (set_key({"kind": "pixels"}, "decoder"),
                       "expected a pixels decoder on a model of 1 or 3 channels (grey, RGB), got 4 channels"),
    "decoder-video": (set_key({"kind": "video-vae", "path": "/tmp/vae"}, "decoder"),
                      "expected decoder.kind of a dit build to be pixels or vae, got 'video-vae'"),
}


@pytest.mark.parametrize("case", FORGED)
def test_a_forged_manifest_is_held_to_its_graphs(micro, tmp_path, case):
    d = copy_engine(micro[2], tmp_path / "eng")
    edit, message = FORGED[case]
    edit_manifest(d, edit)  # resealed
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert message in one_line(e) and "rebuild" in str(e.value)
    r = CliRunner().invoke(main, ["-q", "generate", str(d), "--steps", "3", "--out", str(tmp_path / "a.npz")])
    assert message in cli_error(r) and not (tmp_path / "a.npz").exists()
    r = CliRunner().invoke(main, ["-q", "inspect", str(d), "--verify"])
    assert message in cli_error(r)


@pytest.mark.parametrize("case", ["num-classes-1000", "latent-shape", "decoder-pixels"])
def test_build_rebuilds_over_a_forged_manifest(micro, fake_export, tmp_path, case):
    d = copy_engine(micro[2], tmp_path / "eng")
    edit_manifest(d, FORGED[case][0])
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused
    Pipeline.load(d).generate([1], steps=2)


@pytest.fixture(scope="module")
def flux_manifest():
    """A FLUX manifest as a build writes it (flux-tiny, random weights; no graphs exported: the
    schema and the claims are what is checked here)."""
    from clusca_trt.engines.schema import BUILDS
    from clusca_trt.models import load_model
    from clusca_trt.spec import BuildOptions

    model = load_model("flux-tiny", random_init=True, seed=0)
    options = BuildOptions(batch=1, clusters=2, order=1, kmeans_iterations=2)
    spec = model.adapter.export_spec(options)
    entry = lambda n: {"file": f"{n}.onnx", "files": [{"file": f"{n}.onnx", "bytes": 1, "sha256": "0" * 64}]}  # noqa: E731
    data = {
        "format": FORMAT, "key": "0" * 64, "build_dir": f"{BUILDS}/x", "previous": None,
        "model": {"name": model.name, "family": model.family, "config": model.model_config, "options": model.options,
                  "source": model.source, "sampling": model.adapter.sampling_info()},
        "decoder": None, "build": asdict(options), "spec": spec.to_dict(),
        "graphs": {n: entry(n) for n in spec.graphs}, "versions": {}, "defaults": {},
    }
    check_manifest(json.loads(json.dumps(data)), "flux/manifest.json", FORMAT)  # as built: accepted
    return data


FLUX_FORGED = {
    "latent-size": ("latent_size", [100000, 100000], "expected model.sampling.latent_size [h, w] (even) with h w / 4"),
    "image-tokens": ("image_tokens", 10**9, "expected model.sampling.image_tokens to be"),
    "latent-channels": ("latent_channels", 5, "expected model.sampling.latent_channels to be"),
    "height": ("height", 4096, "expected model.sampling.height to be"),
    "guidance": ("guidance_embeds", False, "expected model.sampling.guidance_embeds to be"),
    "pooled": ("pooled_dim", 7, "expected model.sampling.pooled_dim to be"),
    "default-steps": ("default_steps", 10**8, "expected model.sampling.default_steps in 1..10000"),
    "latent-size-missing": ("latent_size", None, "expected model.sampling.latent_size, got none"),
}


@pytest.mark.parametrize("case", FLUX_FORGED)
def test_flux_sampling_facts_are_held_to_the_spec(flux_manifest, case):
    key, value, message = FLUX_FORGED[case]
    data = json.loads(json.dumps(flux_manifest))
    if value is None:
        del data["model"]["sampling"][key]
    else:
        data["model"]["sampling"][key] = value
        data["model"]["config"].pop(key, None)  # the forger keeps the config consistent
    with pytest.raises(EngineError) as e:
        check_manifest(data, "flux/manifest.json", FORMAT)
    assert message in one_line(e)


def test_flux_decoders_are_the_family_s(flux_manifest):
    data = json.loads(json.dumps(flux_manifest))
    data["decoder"] = {"kind": "pixels"}
    with pytest.raises(EngineError) as e:
        check_manifest(data, "flux/manifest.json", FORMAT)
    assert "expected decoder.kind of a flux build to be vae, got 'pixels'" in one_line(e)


def test_run_defaults_written_by_our_writer_are_accepted(micro, tmp_path):
    """What ``clusca-trt tune --write`` does: new run defaults through ``replace_manifest`` (under the
    build lock), which seals the manifest again; a load accepts them and uses them."""
    d = copy_engine(micro[2], tmp_path / "eng")
    with build_lock(d):
        data = json.loads((d / "manifest.json").read_text())
        replace_manifest(d, dict(data, defaults=dict(data["defaults"], interval=3)))
    pipe = Pipeline.load(d)
    assert pipe.defaults.interval == 3
    assert pipe.generate([1], steps=2).config.interval == 3


def test_manifest_write_seals_what_it_writes(micro, tmp_path):
    """``Manifest.write`` (TensorRT plans are recorded through it) writes a manifest a load accepts."""
    d = copy_engine(micro[2], tmp_path / "eng")
    m = Manifest.read(d)
    Manifest(dict(m.data, created="2030-01-01T00:00:00Z"), d).write()
    assert Manifest.read(d).data["created"] == "2030-01-01T00:00:00Z"


def test_build_folders_are_visible(micro):
    d = micro[2].directory
    assert sorted(p.name for p in d.iterdir()) == [".lock", "builds", "manifest.json"]
    assert micro[2].build_dir.parent == d / "builds" and micro[2].data["build_dir"].startswith("builds/")


def _as_format_3(micro, d):
    """``d``: the micro engines laid out as format 3 wrote them (the hidden ``.builds/``, no digest)."""
    copy_engine(micro[2], d)
    (d / "builds").rename(d / ".builds")
    data = json.loads((d / "manifest.json").read_text())
    data.pop("digest", None)
    data.update(format=3, build_dir=data["build_dir"].replace("builds/", ".builds/", 1))
    (d / "manifest.json").write_text(json.dumps(data))
    (d / "notes.txt").write_text("mine")
    return data["build_dir"]


def test_a_directory_of_the_hidden_layout_is_refused_then_migrated_by_build(micro, fake_export, tmp_path):
    d = tmp_path / "eng"
    old = _as_format_3(micro, d)
    with pytest.raises(EngineError) as e:
        Pipeline.load(d)
    assert f"expected engine format {FORMAT}" in one_line(e) and "got 3; rebuild with clusca-trt build" in str(e.value)
    assert f"expected engine format {FORMAT}" in cli_error(CliRunner().invoke(main, ["-q", "inspect", str(d)]))
    r = build_engines(micro_model(), OPTIONS[2], d)
    assert not r.reused and r.manifest.data["previous"] == old  # kept for a reader of the old manifest
    assert (d / old).is_dir()
    Pipeline.load(d).generate([1], steps=2)
    build_engines(micro_model(), OPTIONS[2], d, force=True)  # the next build removes .builds/ with it
    assert sorted(p.name for p in d.iterdir()) == [".lock", "builds", "manifest.json", "notes.txt"]
    assert len(list((d / "builds").iterdir())) == 2
    Pipeline.load(d).generate([1], steps=2)


def test_inspect_prints_the_path_of_every_graph_file(micro):
    m = micro[2]
    r = CliRunner().invoke(main, ["-q", "inspect", str(m.directory)])
    assert r.exit_code == 0, r.output
    files = [ln.split("file: ", 1)[1] for ln in r.output.splitlines() if ln.strip().startswith("file: ")]
    want = [str(m.build_dir / f["file"]) for e in m.data["graphs"].values() for f in e["files"]]
    assert sorted(files) == sorted(want) and all(shutil.os.path.isfile(f) for f in files)
    info = json.loads(CliRunner().invoke(main, ["-q", "inspect", str(m.directory), "--json"]).output)
    assert {n: g["path"] for n, g in info["graphs"].items()} == {n: str(p) for n, p in m.graph_paths().items()}


def test_a_spec_whose_engine_state_cannot_fit_is_refused_before_allocating(micro, monkeypatch):
    """A forger can make the spec and the graphs agree on any size: the engine state the spec
    declares must fit this machine's memory before an engine allocates it (here: a machine of 64 KiB)."""
    from clusca_trt.engines import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "physical_memory", lambda: 64 * 1024)
    with pytest.raises(EngineError) as e:
        Pipeline.load(micro[2].directory)
    assert "GiB of engine state, expected at most this machine's 0.0 GiB" in one_line(e)
