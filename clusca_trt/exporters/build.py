"""Build an engine directory: export every graph into a temporary sibling folder, check it,
write the manifest, then swap it into place. A failed build leaves nothing behind, and the
previous engines (if any) untouched.

The directory is content-keyed: the key hashes the model (config + checkpoint content or
random-init seed), the build options and the library versions. Building again with the
same key reuses what is there (after checking the files); any change rebuilds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EngineError
from .onnx_export import export_all
from ..hashing import value_sha256
from ..models import LOADER, LoadedModel
from ..spec import BuildOptions
from ..engines.manifest import FORMAT, MANIFEST, Manifest, describe_files, library_versions, now

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
        manifest.verify(hashes=True)
        return manifest
    except EngineError as e:
        log.info("engine directory %s cannot be reused (%s): rebuilding", out, e)
        return None


def build_engines(
    model: LoadedModel, options: BuildOptions, out: Path, force: bool = False, check=None
) -> BuildResult:
    """Export and check every graph of ``model`` under ``options`` into ``out`` (into
    ``out/<build_name>`` for a model with several builds per directory, e.g. FLUX resolutions).

    ``check(paths)``, if given, also vets the graphs (e.g. ``trt_compat.check_graphs``): on a fresh
    export before anything is written into place, on reused engines before they are returned."""
    out = Path(out)
    if model.build_name is not None:
        if (out / MANIFEST).is_file():
            raise EngineError(
                f"expected a directory of {model.family} builds at {out}, got an engine directory of one build"
            )
        out = out / model.build_name
    if out.exists() and not out.is_dir():
        raise EngineError(f"expected a directory for the engines at {out}, got a file")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise EngineError(f"expected an empty folder or an engine directory at {out}, got a folder with other files")
    spec = model.adapter.export_spec(options)  # validates K against the token count before any work
    versions = library_versions()
    key = build_key(model, options, versions)
    if not force:
        existing = _reusable(out, key)
        if existing is not None:
            log.info("engines in %s are up to date (key %s): reusing them", out, key[:12])
            if check is not None:
                check(existing.graph_paths())
            return BuildResult(existing, reused=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        paths = export_all(model.adapter, spec, tmp)
        if check is not None:
            check(paths)
        data = {
            "format": FORMAT,
            "key": key,
            "created": now(),
            "model": {
                "name": model.name,
                "family": model.family,
                "config": model.model_config,
                "options": model.options,
                "source": model.source,
                "loader": LOADER,
                "sampling": model.adapter.sampling_info(),
            },
            "decoder": model.decoder,
            "build": asdict(options),
            "spec": spec.to_dict(),
            "graphs": describe_files(tmp, paths),
            "versions": versions,
            "defaults": asdict(model.adapter.default_run),
        }
        manifest = Manifest(data, tmp)
        manifest.write()
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("engines written to %s (key %s)", out, key[:12])
    return BuildResult(Manifest(data, out), reused=False)


def _swap_into_place(new: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
