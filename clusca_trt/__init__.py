"""clusca-trt: Cluster-Driven Feature Caching (ClusCa) for Diffusion Transformers, compiled
into static ONNX / TensorRT engines.

    from clusca_trt import Pipeline
    pipe = Pipeline.load("engines/dit")
    out = pipe.generate(class_labels=[207, 360], seed=0)
"""

from __future__ import annotations

from ._version import __version__

from .config import ClusCaConfig, FreshPolicy, Method, UpdateRule
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    ClusCaError,
    ConfigError,
    EngineError,
    EngineMismatchError,
    InputError,
    NonFiniteOutputError,
)

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ClusCaConfig",
    "ClusCaError",
    "ConfigError",
    "EngineError",
    "EngineMismatchError",
    "FreshPolicy",
    "InputError",
    "Method",
    "NonFiniteOutputError",
    "Pipeline",
    "UpdateRule",
    "__version__",
]


def __getattr__(name: str):
    # the runtime pulls in numpy and ONNX Runtime; keep ``import clusca_trt`` light
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'clusca_trt' has no attribute {name!r}")
