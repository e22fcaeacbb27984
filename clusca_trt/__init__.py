"""clusca-trt: Cluster-Driven Feature Caching (ClusCa) for Diffusion Transformers, compiled
into static ONNX / TensorRT engines.

    from clusca_trt import Pipeline
    pipe = Pipeline.load("engines/dit")
    out = pipe.generate(class_labels=[207, 360], seed=0)

    import clusca_trt
    clusca_trt.enable(diffusers_pipe, interval=6)     # ClusCa inside a diffusers pipeline
    clusca_trt.disable(diffusers_pipe)
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
    "disable",
    "enable",
]


def __getattr__(name: str):
    # the runtime pulls in numpy, torch and ONNX Runtime; keep ``import clusca_trt`` light
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline

        return Pipeline
    if name in ("enable", "disable"):  # clusca_trt.diffusers: ClusCa inside a diffusers pipeline
        from . import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module 'clusca_trt' has no attribute {name!r}")
