"""Open what was built: ``open_engine(manifest, backend)`` -> a ``StepEngine``.

    onnxruntime   the graph files through ONNX Runtime (the best provider that really loads)
    tensorrt      the plans built with ``clusca-trt build --backend tensorrt``
    torch         the PyTorch reference: the model the engines were built from, run eagerly; its
                  weights are loaded by the entry point the build recorded in the manifest
                  (``model.loader``, ``module:function``), so this package imports no model code
"""

from __future__ import annotations

import importlib

from ..errors import EngineError
from .base import StepEngine
from .manifest import Manifest

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def open_engine(
    manifest: Manifest,
    backend: str = "onnxruntime",
    provider: str = "auto",
    threads: int | None = None,
) -> StepEngine:
    """The engine of one build. The caller has verified the manifest's files (``Manifest.verify``)."""
    if backend == "onnxruntime":
        from .ort import OrtEngine

        return OrtEngine(manifest.spec, manifest.graph_paths(), provider=provider, threads=threads)
    if backend == "torch":
        from .torch_backend import TorchEngine

        return TorchEngine(load_adapter(manifest), manifest.spec)
    if backend == "tensorrt":
        from .tensorrt import load_engine

        return load_engine(manifest, verify=False)
    raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def load_adapter(manifest: Manifest):
    """The model adapter the engines of ``manifest`` were built from, by the recorded loader."""
    loader = manifest.model.get("loader")
    module, _, function = (loader or "").partition(":")
    if not module or not function:
        raise EngineError(
            f"expected a model loader (module:function) in {manifest.directory}'s manifest, got {loader!r}; "
            f"rebuild with clusca-trt build"
        )
    try:
        load = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise EngineError(f"model loader {loader} of {manifest.directory} cannot be imported: {e}") from e
    return load(manifest.model).adapter
