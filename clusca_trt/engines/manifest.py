"""The engine directory: ``manifest.json`` names the build folder that holds the graph files.

    DIR/manifest.json          model (name, family, config, source + content hash), build options,
                               the ExportSpec, every graph file with its size and sha256, library
                               versions, the cache key, the run defaults (the family's, or those
                               ``write_defaults`` stored, with ``defaults_source`` saying where they
                               came from), ``build_dir``: the build folder below, and ``digest``: the
                               sha256 of all the rest (``replace_manifest`` writes it, ``Manifest.read`` checks it)
    DIR/builds/<id>/           one build's graph files (<graph>.onnx, <graph>.onnx.data); written
                               once, never changed (immutable), removed two builds later
    DIR/<graph>.<key>.plan     TensorRT plans, where built (``exporters.trt_build``), named in the manifest
    DIR/.lock                  the build lock (``build_lock``)

A build writes a new build folder, then replaces ``manifest.json`` by one atomic rename: that
rename is the switch, so there is no moment without an engine and a reader never sees two builds.
A reader reads the manifest once and opens every file from the build folder it names
(``read_build`` retries once from a fresh manifest where a rebuild removed that folder meanwhile).
Two builds of one directory take turns (``build_lock``); files a user put in the directory are
never touched.

An engine directory is data: nothing in it names code, and what it says is checked before use.
``Manifest.read`` reads at most ``files.MAX_JSON_BYTES`` nested at most ``files.MAX_JSON_DEPTH``
deep, refuses a manifest whose ``digest`` is not the sha256 of the rest (edited after it was
written: rebuild), and checks the schema and the claims of ``model.sampling`` and ``decoder``
against the spec (``engines.schema``). ``check`` holds every graph file to the spec: size,
sha256, its inputs and outputs (``engines.signature``), external data only in files of its own
entry, and the label embedding's rows against the class count. The digest is unkeyed: it catches
edits, not a forger who recomputes it; the checks against the graph files are what bound what a
forged manifest can do (see the README, "Robustness").

Our own code writes manifests through ``replace_manifest`` alone (a build, ``Manifest.write`` for
TensorRT plans, new run defaults), which seals each with its digest.

A model with several builds (FLUX: one per resolution) keeps each in ``DIR/<build name>/``;
``find_build`` picks the one whose model options match a selection (e.g. height and width).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

from ..config import ClusCaConfig
from ..errors import EngineError, EngineMismatchError, one_line
from ..files import file_lock, read_json, write_text_atomic
from ..hashing import file_sha256
from ..spec import ExportSpec
from .schema import check_manifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"
# 5: the partial graph's update rule input and the cluster graphs' pair flag; 4: build folders in
# builds/ (were .builds/), the manifest sealed by its digest, no model loader; 3: cond and plain graphs,
# sampling facts and the model loader in the manifest; 2: graph files in an immutable build folder named
# by the manifest (1: beside it)
FORMAT = 5
DIGEST = "digest"

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


def state_bytes(spec: ExportSpec) -> int:
    """Bytes of a spec's engine state (module caches, hidden states, centroids: what an engine
    allocates from the spec before its first run), float32."""
    return sum(4 * math.prod(int(d) for d in t.shape) for t in spec.state_tensors().values())


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def build_lock(directory: Path):
    """An exclusive lock on the engine directory ``directory`` (``DIR/.lock``) for the time of a
    build or a manifest update: two builds of one directory take turns, never interleave."""
    return file_lock(Path(directory) / LOCK)


def read_manifest_json(directory: Path) -> dict | None:
    """The raw JSON of ``DIR/manifest.json`` (None where there is none or it cannot be parsed),
    read with bounds (``files.read_json``); neither its digest nor its schema is checked."""
    try:
        data = read_json(Path(directory) / MANIFEST)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def manifest_digest(data: dict) -> str:
    """The sha256 of a manifest's canonical JSON (sorted keys, no spaces), its ``digest`` left out."""
    body = {k: v for k, v in data.items() if k != DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def replace_manifest(directory: Path, data: dict) -> dict:
    """Write ``DIR/manifest.json`` by one atomic rename (the caller holds the build lock), sealed
    with its ``digest``: the one writer of manifests (a build, TensorRT plans, run defaults), so
    that what our code wrote is what ``Manifest.read`` accepts, and an edit by hand is refused.
    Returns the data as written (with its digest)."""
    sealed = {k: v for k, v in data.items() if k != DIGEST}
    sealed[DIGEST] = manifest_digest(sealed)
    write_text_atomic(Path(directory) / MANIFEST, json.dumps(sealed, indent=2, sort_keys=True))
    return sealed


def _refuse_unsealed(data, path: Path) -> None:
    """A one-line ``EngineError`` unless ``data`` is a JSON object of this format whose digest is
    the sha256 of the rest (what ``replace_manifest`` wrote, unedited)."""
    if not isinstance(data, dict):
        check_manifest(data, path, FORMAT)  # raises: expected a JSON object, got ...
    if data.get("format") != FORMAT:
        raise EngineError(f"expected engine format {FORMAT} in {path}, got {data.get('format')!r}; "
                          f"rebuild with clusca-trt build")
    digest = data.get(DIGEST)
    if not isinstance(digest, str):
        raise EngineError(f"{path} is not sealed: expected its digest, got none (written by hand?); "
                          f"rebuild with clusca-trt build")
    try:
        actual = manifest_digest(data)
    except (TypeError, ValueError) as e:  # NaN or inf: json allows them on reading, never writes them here
        raise EngineError(f"{path} is not a valid manifest: {one_line(e)}; rebuild with clusca-trt build")
    if actual != digest:
        raise EngineError(f"{path} was changed after clusca-trt wrote it: expected digest {digest[:16]}..., "
                          f"got {actual[:16]}... for its content; rebuild with clusca-trt build")


def config_dict(config: ClusCaConfig) -> dict:
    """A ``ClusCaConfig`` as the manifest's ``defaults`` hold it: every field, enums as their values."""
    return {f.name: (v.value if isinstance(v, Enum) else v)
            for f in dataclasses.fields(config) for v in [getattr(config, f.name)]}


def write_defaults(directory: Path, config: ClusCaConfig, source: dict, build_dir: str | None = None) -> "Manifest":
    """Store ``config`` as the run defaults of the build in ``directory`` (what ``generate``, ``bench``,
    ``serve`` and ``Pipeline.generate`` use unless told otherwise), and ``source`` (where they came
    from, e.g. ``{"tool": "tune", "min_psnr": 38.0, "created": ...}``) as ``defaults_source``.

    The one writer of run defaults after a build. The manifest is rewritten whole, under the build
    lock, by the build's own mechanism (a temporary file, fsync, one ``os.replace``): a reader, or a
    process killed at any moment, sees the old manifest or the new one, never a part; the new one is
    schema-checked before it replaces the old. ``build_dir``: the build the settings were measured on;
    where the directory was rebuilt meanwhile, nothing is written (an ``EngineError``)."""
    directory = Path(directory)
    try:
        text = json.dumps(source, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise EngineError(f"expected defaults_source to be plain JSON, got {type(e).__name__}: {e}") from None
    with build_lock(directory):
        current = Manifest.read(directory)  # schema-checked
        if build_dir is not None and current.data.get("build_dir") != build_dir:
            raise EngineError(
                f"the engines in {directory} were rebuilt meanwhile (build {current.data.get('build_dir')}, "
                f"expected {build_dir}); run clusca-trt tune again"
            )
        data = dict(current.data, defaults=config_dict(config), defaults_source=json.loads(text))
        check_manifest(data, directory / MANIFEST, FORMAT)
        data = replace_manifest(directory, data)  # sealed with its new digest
    log.info("run defaults of %s set to %s (from %s)", directory, data["defaults"], source.get("tool"))
    return Manifest(data, directory)


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
    def defaults_source(self) -> dict | None:
        """Where the run defaults came from (``write_defaults``); None: the model family's, set by the build."""
        return self.data.get("defaults_source")

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
        data = _read(path)
        _refuse_unsealed(data, path)
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
        then every graph file against the spec and the manifest (``engines.signature.graph_problem``):
        its inputs and outputs (names, static shapes, dtypes), its external data only in the files of
        its own entry (nothing outside the build folder), and the label embedding's rows against
        the class count. A swapped, foreign or forged graph file is refused here, not part-way
        through sampling."""
        from .signature import graph_problem, read_graph

        self.verify(hashes=hashes)
        spec = self.spec
        need, have = state_bytes(spec), physical_memory()
        if have is not None and need > have:  # a forged spec (and graphs to match) must not allocate it
            raise EngineError(f"the engines in {self.directory} need {need / 2**30:.1f} GiB of engine state, expected "
                              f"at most this machine's {have / 2**30:.1f} GiB; rebuild with a smaller --batch")
        num_classes = self.model["sampling"].get("num_classes")
        for name, path in self.graph_paths().items():
            try:
                graph = read_graph(path)
            except Exception as e:  # onnx raises protobuf's DecodeError and others for a file that is not ONNX
                raise EngineError(f"engine file {path.name} cannot be read as ONNX ({type(e).__name__}); "
                                  f"rebuild with clusca-trt build") from e
            data_files = [f["file"] for f in self.data["graphs"][name]["files"][1:]]
            problem = graph_problem(graph, path.name, spec.graphs[name], data_files, num_classes)
            if problem is not None:
                raise EngineError(f"{problem}; rebuild with clusca-trt build")


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
                     one_line(e))
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


def _read(path: Path):
    """The JSON of a manifest file, read with bounds, or a one-line ``EngineError``."""
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} is not a readable manifest: {one_line(e)}; rebuild with clusca-trt build") from e


def _built_options(directory: Path) -> dict:
    """The model options a build was made for (all ``find_build`` needs; ``Manifest.read`` checks the rest)."""
    path = Path(directory) / MANIFEST
    data = _read(path)
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
