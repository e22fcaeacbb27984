"""The engine directory: ``manifest.json`` names the build folder that holds the graph files.

    DIR/manifest.json          model (name, family, config, source + content hash), build options,
                               the ExportSpec, every graph file with its size and sha256, library
                               versions, the cache key, the family's default run settings, and
                               ``build_dir``: the build folder below
    DIR/.builds/<id>/          one build's graph files (<graph>.onnx, <graph>.onnx.data); written
                               once, never changed (immutable), removed two builds later
    DIR/<graph>.<key>.plan     TensorRT plans, where built (``exporters.trt_build``), named in the manifest
    DIR/.lock                  the build lock (``build_lock``)

A build writes a new build folder, then replaces ``manifest.json`` by one atomic rename: that
rename is the switch, so there is no moment without an engine and a reader never sees two builds.
A reader reads the manifest once and opens every file from the build folder it names
(``read_build`` retries once from a fresh manifest where a rebuild removed that folder meanwhile).
Two builds of one directory take turns (``build_lock``); files a user put in the directory are
never touched. The manifest is schema-checked when read (``engines.schema``), and ``check``
holds every graph file to the spec: size, sha256, and its inputs and outputs (``engines.signature``).

A model with several builds (FLUX: one per resolution) keeps each in ``DIR/<build name>/``;
``find_build`` picks the one whose model options match a selection (e.g. height and width).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import EngineError, EngineMismatchError
from ..files import file_lock, write_text_atomic
from ..hashing import file_sha256
from ..spec import ExportSpec
from .schema import BUILDS, check_manifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
# 3: cond and plain graphs, sampling facts and the model loader in the manifest; 2: graph files in an
# immutable build folder named by the manifest (1: beside it)
FORMAT = 3

T = TypeVar("T")


def library_versions() -> dict[str, str]:
    from .._version import __version__

    out = {"python": platform.python_version(), "clusca-trt": __version__}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "openvino", "diffusers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_lock(directory: Path):
    """An exclusive lock on the engine directory ``directory`` (``DIR/.lock``) for the time of a
    build or a manifest update: two builds of one directory take turns, never interleave."""
    return file_lock(Path(directory) / LOCK)


def read_manifest_json(directory: Path) -> dict | None:
    """The raw JSON of ``DIR/manifest.json`` (None where there is none or it cannot be parsed)."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def replace_manifest(directory: Path, data: dict) -> None:
    """Write ``DIR/manifest.json`` by one atomic rename (the caller holds the build lock)."""
    write_text_atomic(Path(directory) / MANIFEST, json.dumps(data, indent=2, sort_keys=True))


@dataclass(frozen=True)
class Manifest:
    data: dict
    directory: Path  # the engine directory the user named

    @property
    def key(self) -> str:
        return self.data["key"]

    @property
    def spec(self) -> ExportSpec:
        return ExportSpec.from_dict(self.data["spec"])

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def defaults(self) -> dict:
        return self.data.get("defaults", {})

    @property
    def build_dir(self) -> Path:
        """The immutable folder of this build's graph files."""
        return Path(self.directory) / self.data["build_dir"]

    def graph_path(self, name: str) -> Path:
        return self.build_dir / self.data["graphs"][name]["file"]

    def graph_paths(self) -> dict[str, Path]:
        return {n: self.graph_path(n) for n in self.data["graphs"]}

    def plan_path(self, file: str) -> Path:
        """A TensorRT plan file named in the manifest's ``tensorrt`` section (kept beside the manifest)."""
        return Path(self.directory) / file

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        """The manifest of an engine directory, schema-checked (a one-line ``EngineError`` otherwise)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise EngineError(f"expected an engine directory with {MANIFEST} at {directory}, got none; run clusca-trt build")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EngineError(f"{path} is not a readable manifest: {e}".splitlines()[0]) from e
        check_manifest(data, path, FORMAT)
        return cls(data, directory)

    def write(self) -> None:
        """Replace the directory's manifest with this one (e.g. with TensorRT plans added), under the
        build lock, and only if the directory still holds this manifest's build: a manifest read
        before a rebuild never replaces the rebuilt one."""
        with build_lock(self.directory):
            current = read_manifest_json(self.directory)
            if current is not None and current.get("build_dir") != self.data.get("build_dir"):
                raise EngineError(
                    f"the engines in {self.directory} were rebuilt meanwhile (build {current.get('build_dir')}, "
                    f"expected {self.data.get('build_dir')}); run the command again"
                )
            replace_manifest(self.directory, self.data)

    def is_current(self) -> bool:
        """Whether the directory's manifest still names this build and its folder is there."""
        current = read_manifest_json(self.directory)
        return bool(current) and current.get("build_dir") == self.data.get("build_dir") and self.build_dir.is_dir()

    def _entries(self):
        """(folder, entry) of every graph file set and TensorRT plan."""
        for entry in self.data["graphs"].values():
            yield self.build_dir, entry
        for entry in self.data.get("tensorrt", {}).get("plans", {}).values():
            yield Path(self.directory), entry

    def verify(self, hashes: bool = True) -> None:
        """Every graph file (and its external data) and TensorRT plan, if any, exists with the
        recorded size and sha256."""
        for folder, entry in self._entries():
            for f in entry["files"]:
                p = folder / f["file"]
                try:
                    size = p.stat().st_size if p.is_file() else None
                    digest = file_sha256(p) if hashes and size == f["bytes"] else None
                except OSError:  # removed while we read it
                    size = digest = None
                if size is None:
                    raise EngineError(f"engine file {f['file']} is missing from {self.directory}; rebuild with clusca-trt build")
                if size != f["bytes"]:
                    raise EngineError(
                        f"engine file {f['file']} is truncated or changed: expected {f['bytes']} bytes, got {size}; "
                        f"rebuild with clusca-trt build"
                    )
                if hashes and digest != f["sha256"]:
                    raise EngineError(
                        f"engine file {f['file']} is corrupt: its sha256 does not match the manifest; "
                        f"rebuild with clusca-trt build"
                    )

    def check(self, hashes: bool = True) -> None:
        """The full check before use (``Pipeline.load``, ``inspect --verify``, build reuse): ``verify``,
        then every graph file's inputs and outputs (names, static shapes, dtypes) against the spec,
        so a swapped or foreign graph file is refused here, not part-way through sampling."""
        from .signature import signature_mismatch

        self.verify(hashes=hashes)
        spec = self.spec
        for name, path in self.graph_paths().items():
            try:
                mismatch = signature_mismatch(path, spec.graphs[name])
            except Exception as e:  # onnx raises protobuf's DecodeError and others for a file that is not ONNX
                raise EngineError(f"engine file {path.name} cannot be read as ONNX ({type(e).__name__}); "
                                  f"rebuild with clusca-trt build") from e
            if mismatch is not None:
                raise EngineError(f"{mismatch}; rebuild with clusca-trt build")


def read_build(directory: Path, use: Callable[[Manifest], T], select: dict | None = None) -> T:
    """``use(manifest)`` on the build of ``directory`` (``find_build``), where ``use`` opens its files.

    The manifest is read once and every file comes from the build folder it names, so one call
    never mixes builds. Where a rebuild replaced that build while ``use`` ran (its folder removed,
    or the manifest names another), ``use`` runs once more on a fresh read."""
    for attempt in (1, 2):
        manifest = Manifest.read(find_build(Path(directory), select))
        try:
            return use(manifest)
        except (EngineError, OSError) as e:
            if attempt == 2 or manifest.is_current():
                raise
            log.info("engines in %s were rebuilt while loading (%s): loading the new build", manifest.directory,
                     str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise AssertionError("unreachable")


def describe_files(directory: Path, graph_files: dict[str, Path]) -> dict:
    graphs = {}
    for name, path in graph_files.items():
        files = [path] + sorted(p for p in directory.glob(path.name + "*.data") if p.is_file())
        files += sorted(p for p in directory.glob(path.stem + ".data") if p.is_file() and p not in files)
        graphs[name] = {
            "file": path.name,
            "files": [{"file": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files],
        }
    return graphs


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "no options"


def list_builds(directory: Path) -> list[Path]:
    """The builds in an engine directory: itself when it has a manifest, else its subfolders that
    have one (FLUX: one per resolution). None at all is the usual "expected an engine directory" error."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return [directory]
    builds = sorted(p for p in directory.iterdir() if (p / MANIFEST).is_file()) if directory.is_dir() else []
    if not builds:
        Manifest.read(directory)  # raises
    return builds


def _built_options(directory: Path) -> dict:
    """The model options a build was made for (all ``find_build`` needs; ``Manifest.read`` checks the rest)."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} is not a readable manifest: {e}".splitlines()[0]) from e
    if not isinstance(data, dict):
        check_manifest(data, path, FORMAT)  # raises: expected a JSON object, got ...
    if data.get("format") != FORMAT:
        raise EngineError(f"expected engine format {FORMAT} in {path}, got {data.get('format')!r}; "
                          f"rebuild with clusca-trt build")
    model = data.get("model", {})
    options = model.get("options", {}) if isinstance(model, dict) else None
    if not isinstance(options, dict):
        raise EngineError(f"{path} is not a valid manifest: expected model.options to be an object; "
                          f"rebuild with clusca-trt build")
    return options


def find_build(directory: Path, select: dict | None = None) -> Path:
    """The engine directory to open: ``directory`` itself when it is one, else the one build in
    it (a subfolder with a manifest) whose model options match ``select`` (None values ignored)."""
    directory = Path(directory)
    select = {k: v for k, v in (select or {}).items() if v is not None}
    if (directory / MANIFEST).is_file():
        built = _built_options(directory)
        if any(built.get(k) != v for k, v in select.items()):
            raise EngineMismatchError(
                f"engines in {directory} were built for {_options_text({k: built.get(k) for k in select})}, "
                f"requested {_options_text(select)}; build them with clusca-trt build"
            )
        return directory
    builds = list_builds(directory)
    options = {p: _built_options(p) for p in builds}
    matching = [p for p in builds if all(options[p].get(k) == v for k, v in select.items())]
    names = ", ".join(p.name for p in builds)
    if not matching:
        raise EngineMismatchError(
            f"{directory} holds builds {names}, none for {_options_text(select)}; build it with clusca-trt build"
        )
    if len(matching) > 1:
        keys = sorted({k for p in matching for k in options[p] if options[p][k] != options[matching[0]].get(k)})
        raise EngineError(f"{directory} holds builds {names}: expected a choice of {', '.join(keys)}, got none")
    return matching[0]
