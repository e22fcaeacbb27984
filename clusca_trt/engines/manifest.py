"""The engine directory: ``manifest.json`` beside the graph files says what they are.

    DIR/manifest.json   model (name, family, config, source + content hash), build options,
                        the ExportSpec, every graph file with its size and sha256,
                        library versions, the cache key, the family's default run settings
    DIR/<graph>.onnx    (and <graph>.onnx.data for large weights)

A model with several builds (FLUX: one per resolution) keeps each in ``DIR/<build name>/``;
``find_build`` picks the one whose model options match a selection (e.g. height and width).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import EngineError, EngineMismatchError
from ..hashing import file_sha256
from ..spec import ExportSpec

MANIFEST = "manifest.json"
FORMAT = 2  # 2: cond and plain graphs, sampling facts and the model loader in the manifest


def library_versions() -> dict[str, str]:
    from .._version import __version__

    out = {"python": platform.python_version(), "clusca-trt": __version__}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "diffusers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Manifest:
    data: dict
    directory: Path

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

    def graph_path(self, name: str) -> Path:
        return self.directory / self.data["graphs"][name]["file"]

    def graph_paths(self) -> dict[str, Path]:
        return {n: self.graph_path(n) for n in self.data["graphs"]}

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise EngineError(f"expected an engine directory with {MANIFEST} at {directory}, got none; run clusca-trt build")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EngineError(f"{path} is not a readable manifest: {e}".splitlines()[0]) from e
        if data.get("format") != FORMAT:
            raise EngineError(f"expected engine format {FORMAT} in {path}, got {data.get('format')}; rebuild")
        return cls(data, directory)

    def write(self) -> None:
        path = self.directory / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        tmp.replace(path)

    def verify(self, hashes: bool = True) -> None:
        """Every graph file (and its external data) and TensorRT plan, if any, exists with the
        recorded size and sha256."""
        entries = list(self.data["graphs"].values()) + list(self.data.get("tensorrt", {}).get("plans", {}).values())
        for entry in entries:
            for f in entry["files"]:
                p = self.directory / f["file"]
                if not p.is_file():
                    raise EngineError(f"engine file {f['file']} is missing from {self.directory}; rebuild with clusca-trt build")
                size = p.stat().st_size
                if size != f["bytes"]:
                    raise EngineError(
                        f"engine file {f['file']} is truncated or changed: expected {f['bytes']} bytes, got {size}; "
                        f"rebuild with clusca-trt build"
                    )
                if hashes and file_sha256(p) != f["sha256"]:
                    raise EngineError(
                        f"engine file {f['file']} is corrupt: its sha256 does not match the manifest; "
                        f"rebuild with clusca-trt build"
                    )


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


def find_build(directory: Path, select: dict | None = None) -> Path:
    """The engine directory to open: ``directory`` itself when it is one, else the one build in
    it (a subfolder with a manifest) whose model options match ``select`` (None values ignored)."""
    directory = Path(directory)
    select = {k: v for k, v in (select or {}).items() if v is not None}
    if (directory / MANIFEST).is_file():
        built = Manifest.read(directory).model.get("options", {})
        if any(built.get(k) != v for k, v in select.items()):
            raise EngineMismatchError(
                f"engines in {directory} were built for {_options_text({k: built.get(k) for k in select})}, "
                f"requested {_options_text(select)}; build them with clusca-trt build"
            )
        return directory
    builds = list_builds(directory)
    options = {p: Manifest.read(p).model.get("options", {}) for p in builds}
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
