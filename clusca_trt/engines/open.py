"""Open what was built: ``open_engine(manifest, backend)`` -> a ``StepEngine``.

    onnxruntime   the graph files through ONNX Runtime (the best provider that really loads)
    openvino      the graph files through OpenVINO Runtime's CPU plugin, in ``precision`` (fp32, bf16,
                  fp16; default bf16 where the CPU has bf16 units, else fp32; k-means and selection fp32),
                  its compiled models cached in ``<engine dir>/openvino-cache``
    tensorrt      the plans built with ``clusca-trt build --backend tensorrt``, on ``device`` cuda:N
    torch         the model the engines were built from, run by PyTorch on ``device`` (cpu, cuda,
                  cuda:N) in ``precision`` (fp32, bf16, fp16; CUDA graphs on a GPU): the caller
                  passes its ``adapter`` (``Pipeline.load`` loads it by the build's family, from the
                  family registry; nothing in a manifest names code), so ``engines`` import no model code

``device`` and ``precision`` are None where the backend's default is meant: ONNX Runtime picks its
device by ``provider`` and runs the float32 graphs; OpenVINO runs on the CPU in the best precision
it has units for; TensorRT runs cuda:0 in the plans' precision.
"""

from __future__ import annotations

from ..errors import ConfigError, EngineError, EngineMismatchError
from .base import StepEngine
from .manifest import Manifest

BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")


def open_engine(
    manifest: Manifest,
    backend: str = "onnxruntime",
    provider: str = "auto",
    threads: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    load_adapter=None,
) -> StepEngine:
    """The engine of one build. The caller has verified the manifest's files (``Manifest.verify``).

    ``provider``: ONNX Runtime's (auto: the best one that really loads); ``threads``: intra-op threads
    (CPU backends); ``device`` / ``precision``: the torch backend's (TensorRT: the GPU; its plans'
    precision is checked; OpenVINO: ``cpu`` only, and the model graphs' inference precision); ``load_adapter``: a function that loads the model the build was made from
    (the torch backend only; called after the device and precision are checked)."""
    if backend == "onnxruntime":
        from .ort import TRT_CACHE_DIR, OrtEngine

        if device is not None or precision not in (None, "fp32"):
            raise ConfigError("device and precision apply to the torch, openvino and tensorrt backends; ONNX Runtime "
                              "runs the float32 graphs on its provider's device (choose it with provider)")
        # the TensorRT provider's engine cache: in the engine directory (the build folders are immutable)
        return OrtEngine(manifest.spec, manifest.graph_paths(), provider=provider, threads=threads,
                         trt_cache_dir=manifest.directory / TRT_CACHE_DIR)
    if backend == "openvino":
        from .openvino import CACHE_DIR, OpenVinoEngine

        if device not in (None, "cpu"):
            raise ConfigError(f"the openvino backend runs on the CPU: expected device cpu, got {device!r}")
        if provider not in ("auto", "cpu"):
            raise ConfigError(f"providers are ONNX Runtime's: expected provider auto or cpu with openvino, got {provider!r}")
        # the compiled-model cache: in the engine directory (the build folders are immutable)
        return OpenVinoEngine(manifest.spec, manifest.graph_paths(), precision=precision, threads=threads,
                              cache_dir=manifest.directory / CACHE_DIR)
    if backend == "torch":
        from .torch_backend import TorchEngine, check_precision, parse_device

        device, precision = parse_device(device or "cpu"), precision or "fp32"
        check_precision(precision)  # both before the model is loaded
        if load_adapter is None:
            raise EngineError("the torch backend runs the model the engines were built from: expected its loader, "
                              "got none (Pipeline.load loads it by the build's family)")
        return TorchEngine(load_adapter(), manifest.spec, device=device, precision=precision)
    if backend == "tensorrt":
        from .tensorrt import load_engine

        built = manifest.data.get("tensorrt", {}).get("options", {}).get("precision")
        if precision is not None and built is not None and precision != built:
            raise EngineMismatchError(f"TensorRT plans in {manifest.directory} were built in {built}, requested "
                                      f"{precision}; rebuild with clusca-trt build --backend tensorrt --precision {precision}")
        return load_engine(manifest, device=cuda_index(device), verify=False)
    raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def cuda_index(device: str | None) -> int:
    """``None``, ``cuda`` or ``cuda:N`` -> N (0 by default); anything else is refused."""
    if device in (None, "cuda"):
        return 0
    head, _, index = str(device).partition(":")
    if head != "cuda" or not index.isdigit():
        raise ConfigError(f"device must be cuda or cuda:N for TensorRT, got {device!r}")
    return int(index)
