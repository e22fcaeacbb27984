"""Build an engine directory: export every graph into a new build folder, check it, then switch
the manifest to it by one atomic rename. A failed or killed build leaves the previous engines
in use and untouched; its folder is removed by the next build.

    DIR/builds/<key>-<time>-<id>/    the new build's graph files (immutable once written)
    DIR/manifest.json                replaced by one rename: names the build folder in use, sealed
                                     with its digest (``replace_manifest``)

Two builds of one directory take turns (``build_lock``). The build before the current one stays
until the next build (a reader that read the old manifest can finish loading it); anything older,
and the folders of killed builds, are removed under the lock. Files a user put in the directory
are never touched. A directory of format 3 (build folders in the hidden ``.builds/``) is rebuilt:
its build stays as the previous one, and the next build removes ``.builds/`` with it.

The directory is content-keyed: the key hashes the model (config + checkpoint content or
random-init seed), the build options and the library versions. Building again with the
same key reuses what is there (after the full check ``Pipeline.load`` runs); any change rebuilds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, EngineError
from .onnx_export import export_all
from ..files import user_mode
from ..hashing import value_sha256
from ..models import LoadedModel
from ..spec import BuildOptions, ExportSpec
from ..engines.manifest import (FORMAT, LOCK, MANIFEST, Manifest, build_lock, describe_files, library_versions, now,
                                physical_memory, read_manifest_json, replace_manifest, state_bytes)
from ..engines.schema import BUILDS, LEGACY_BUILDS, is_build_dir

log = logging.getLogger(__name__)

# the versions that change what the exporter writes
_KEY_VERSIONS = ("clusca-trt", "torch", "onnx", "onnxscript")


def build_key(model: LoadedModel, options: BuildOptions, versions: dict[str, str]) -> str:
    source = {k: v for k, v in model.source.items() if k not in ("path", "pipeline")}  # where it is: not a key
    return value_sha256(
        {
            "format": FORMAT,
            "model": model.name,
            "family": model.family,
            "config": model.model_config,
            "model_options": model.options,
            "decoder": model.decoder,
            "source": source,
            "options": asdict(options),
            "versions": {k: versions.get(k) for k in _KEY_VERSIONS},
        }
    )


@dataclass(frozen=True)
class BuildResult:
    manifest: Manifest
    reused: bool


def _reusable(out: Path, key: str) -> Manifest | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = Manifest.read(out)
        if manifest.key != key:
            log.info("engine directory %s was built from other inputs: rebuilding", out)
            return None
        manifest.check(hashes=True)  # the same full check as Pipeline.load
        return manifest
    except EngineError as e:
        log.info("engine directory %s cannot be reused (%s): rebuilding", out, e)
        return None


_OURS = {MANIFEST, LOCK, BUILDS, LEGACY_BUILDS}
_BUILD_FOLDERS = (BUILDS, LEGACY_BUILDS)


def _user_files(out: Path) -> list[str]:
    """What is in ``out`` besides an engine directory's own files."""
    return sorted(p.name for p in out.iterdir() if p.name not in _OURS and not p.name.startswith(f".{MANIFEST}."))


def check_memory(spec: ExportSpec, what: str = "this build") -> None:
    """Refuse a build whose engine state (module caches, hidden states; allocated twice while
    exporting) cannot fit in this machine's memory, before anything is allocated."""
    state, total = state_bytes(spec), physical_memory()
    if total is None:
        return
    if 2 * state > total:
        raise ConfigError(
            f"{what} needs about {2 * state / 2**30:.1f} GiB for its engine state (batch {spec.options.batch}, "
            f"graph batch {spec.graph_batch}), expected at most this machine's {total / 2**30:.1f} GiB; "
            f"lower --batch or --order"
        )


def build_engines(
    model: LoadedModel, options: BuildOptions, out: Path, force: bool = False, check=None
) -> BuildResult:
    """Export and check every graph of ``model`` under ``options`` into the engine directory ``out``.

    model:   what ``models.load_model`` returned (adapter, config, source and its hash, decoder).
    options: the static build options (batch, K, O, k-means iterations, distance, opset, cond steps).
    out:     the engine directory (``out/<build_name>`` for a model with several builds per directory,
             e.g. one per FLUX resolution); created if missing, else it must be an engine directory or empty.
    force:   export again even if a build with the same key (model source, options, library versions) exists.
    check:   ``check(paths)`` also vets the graphs (e.g. ``trt_compat.check_graphs``): on a fresh export
             before anything is switched into place, on reused engines before they are returned.

    Returns a ``BuildResult`` (the new or reused ``manifest``, and ``reused``). A build is written into
    a fresh build folder and switched in by one atomic manifest rename under the build lock, so a
    failed or killed build leaves the previous one intact. Raises ``EngineError`` (a path that is not an
    engine directory), ``ConfigError`` (options the model cannot take, too much memory), ``ExportError``."""
    out = Path(out)
    if model.build_name is not None:
        if (out / MANIFEST).is_file():
            raise EngineError(
                f"expected a directory of {model.family} builds at {out}, got an engine directory of one build"
            )
        out = out / model.build_name
    if out.exists() and not out.is_dir():
        raise EngineError(f"expected a directory for the engines at {out}, got a file")
    if out.is_dir() and not (out / MANIFEST).is_file() and _user_files(out):
        raise EngineError(f"expected an empty folder or an engine directory at {out}, got a folder with other files")
    spec = model.adapter.export_spec(options)  # validates K against the token count before any work
    check_memory(spec)
    versions = library_versions()
    key = build_key(model, options, versions)
    created = not out.exists()
    with build_lock(out):
        try:
            return _build_locked(model, options, out, spec, key, versions, force, check)
        except BaseException:
            if created:
                _remove_if_empty(out)
            raise


def _build_locked(model, options, out, spec, key, versions, force, check) -> BuildResult:
    """The build, under the directory's lock."""
    current = read_manifest_json(out)
    _remove_debris(out, keep={current.get("build_dir"), current.get("previous")} if current else set())
    if not force:
        existing = _reusable(out, key)
        if existing is not None:
            log.info("engines in %s are up to date (key %s): reusing them", out, key[:12])
            if check is not None:
                check(existing.graph_paths())
            return BuildResult(existing, reused=True)

    builds = out / BUILDS
    if not builds.is_dir():
        builds.mkdir()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    tmp = Path(tempfile.mkdtemp(prefix=f"{key[:12]}-{stamp}-", dir=builds))
    user_mode(tmp)
    try:
        paths = export_all(model.adapter, spec, tmp)
        if check is not None:
            check(paths)
        previous = _previous_build(out, current)
        data = {
            "format": FORMAT,
            "key": key,
            "created": now(),
            "build_dir": f"{BUILDS}/{tmp.name}",
            "previous": previous,
            "model": {
                "name": model.name,
                "family": model.family,
                "config": model.model_config,
                "options": model.options,
                "source": model.source,
                "sampling": model.adapter.sampling_info(),
            },
            "decoder": model.decoder,
            "build": asdict(options),
            "spec": spec.to_dict(),
            "graphs": describe_files(tmp, paths),
            "versions": versions,
            "defaults": asdict(model.adapter.default_run),
        }
        manifest = Manifest(data, out)
        manifest.check(hashes=False)  # the files and every graph against the spec, as a load checks them (the hashes were just taken), before anyone reads it
        data = replace_manifest(out, data)  # the switch: one atomic rename (sealed with its digest)
        manifest = Manifest(data, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _retire(out, current, keep={f"{BUILDS}/{tmp.name}", previous})
    log.info("engines written to %s (key %s)", out, key[:12])
    return BuildResult(manifest, reused=False)


def _previous_build(out: Path, current: dict | None) -> str | None:
    """The build folder the manifest being replaced names, where it is a valid one that exists
    (format 3's ``.builds/<name>`` too: a reader of that manifest may still be loading it)."""
    name = current.get("build_dir") if current and current.get("format") in (3, FORMAT) else None
    return name if is_build_dir(name, legacy=True) and (out / name).is_dir() else None


def _build_folders(out: Path):
    """(``builds/<name>``, path) of every build folder in ``out``, format 3's ``.builds/`` included."""
    for folder in _BUILD_FOLDERS:
        if (out / folder).is_dir():
            for p in (out / folder).iterdir():
                yield f"{folder}/{p.name}", p


def _remove_debris(out: Path, keep: set) -> None:
    """Folders of killed builds: build folders the manifest does not name (as its build or the
    previous one), and the temporary siblings of the earlier layout (``.NAME.building-*``,
    ``.NAME.old-*``). Called under the lock, so no live build owns them."""
    for rel, p in list(_build_folders(out)):
        if rel not in keep:
            log.info("removing %s (left by an interrupted or superseded build)", p)
            _remove(p)
    _remove_empty_legacy(out)
    for pattern in (f".{out.name}.building-*", f".{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir():
                log.info("removing %s (left by an interrupted build)", p)
                shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(f".{MANIFEST}.*"):  # a manifest update killed before its rename
        p.unlink(missing_ok=True)


def _retire(out: Path, replaced: dict | None, keep: set) -> None:
    """After the switch: remove build folders older than the one just replaced, the TensorRT plans
    of the replaced manifest (built from its graphs), and the graph files of a replaced manifest of
    the earlier format (they lay beside it). Nothing the manifests do not name is touched."""
    for rel, p in list(_build_folders(out)):
        if rel not in keep:
            _remove(p)
    _remove_empty_legacy(out)
    if not replaced:
        return
    named = [f.get("file") for e in (replaced.get("tensorrt") or {}).get("plans", {}).values() for f in e.get("files", [])]
    if "build_dir" not in replaced:  # format 1: graph files beside the manifest
        named += [f.get("file") for e in (replaced.get("graphs") or {}).values() for f in e.get("files", [])]
    for name in named:
        if isinstance(name, str) and name and "/" not in name and name not in (".", "..") and name not in _OURS:
            (out / name).unlink(missing_ok=True)


def _remove_empty_legacy(out: Path) -> None:
    """Format 3's hidden ``.builds/`` goes once no build in it is kept."""
    try:
        (out / LEGACY_BUILDS).rmdir()
    except OSError:  # absent, or still holds the previous build
        pass


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_if_empty(out: Path) -> None:
    """A directory this build created and that holds nothing of use goes again (under the lock)."""
    try:
        for folder in _BUILD_FOLDERS:
            builds = out / folder
            if builds.is_dir() and not any(builds.iterdir()):
                builds.rmdir()
        if {p.name for p in out.iterdir()} <= {LOCK}:
            (out / LOCK).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass
