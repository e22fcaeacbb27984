"""The engine directory: ``manifest.json`` beside the graph files says what they are.

    DIR/manifest.json   model (name, family, config, source + content hash), build options,
                        the ExportSpec, every graph file with its size and sha256,
                        library versions, the cache key, the family's default run settings
    DIR/<graph>.onnx    (and <graph>.onnx.data for large weights)
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import EngineError
from ..hashing import file_sha256
from ..spec import ExportSpec

MANIFEST = "manifest.json"
FORMAT = 1


def library_versions() -> dict[str, str]:
    from .. import __version__

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
        """Every graph file (and its external data) exists with the recorded size and sha256."""
        for name, entry in self.data["graphs"].items():
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
