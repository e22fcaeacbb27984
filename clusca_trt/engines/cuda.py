"""engines/cuda.py: host arrays -> buffers on one torch device -> the host again, on one CUDA stream,
and CUDA graphs captured and replayed on it: the device the TensorRT and torch engines share.

``TorchDevice`` (``cpu`` or ``cuda:N``, checked by ``parse_device``) implements ``Device``, what both
engines are written against:

* ``activate()``: the device current and its stream the current stream (TensorRT deserializes
  and creates contexts on the current device; torch launches kernels on the current stream);
* ``alloc(shape, dtype, staged=True)``: a device buffer with a pinned host twin (``StagedBuffer``);
  ``upload`` writes a host array into the twin and copies it to the device asynchronously on the
  stream, waiting only where the twin is still read by its last copy (never in a steady state);
* ``download(buf)``: a buffer to the host (fp16 / bf16 as fp32) through a pinned buffer: the host
  waits for the stream, one host synchronisation (a step's one: the download of ``out``);
* ``to_device(array)``: a host array on the device without waiting (pinned, asynchronous, on the
  stream);
* ``capture(launch)`` / ``replay(graph)``: a ``torch.cuda.CUDAGraph`` of what ``launch(stream_handle)``
  enqueues (``torch.cuda.graph`` synchronizes the device once before it captures); when to capture
  is ``cuda_graph.GraphCache``'s decision.

``host_syncs`` counts the host's waits for the device; the engines report the device's count. On
the CPU (the torch engine's reference runs) buffers are CPU tensors, copies are plain copies, a
download still counts, and there is no stream and no graph. The TensorRT engine's CPU tests run it
on a numpy twin of ``Device``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import BackendUnavailableError, ConfigError, EngineError
from .base import cpu_name

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
_HALF = (torch.float16, torch.bfloat16)  # staged from and downloaded as fp32


def _no_cuda() -> str | None:
    """Why torch cannot reach a CUDA GPU here (None: it can)."""
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
    return f"{build} (torch {torch.__version__})"


def _check_index(index: int) -> None:
    if not 0 <= index < torch.cuda.device_count():
        raise BackendUnavailableError(f"expected a CUDA device index below {torch.cuda.device_count()}, got {index}")


def require_cuda(index: int, who: str):
    """torch, where it reaches CUDA device ``index``; else a one-line error saying that ``who`` needs one."""
    why = _no_cuda()
    if why:
        raise BackendUnavailableError(f"{who} needs a CUDA GPU through torch, got {why}")
    _check_index(index)
    return torch


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> a torch device that exists here (``cuda`` is ``cuda:0``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    why = _no_cuda()
    if why:
        raise BackendUnavailableError(f"device {device} needs a CUDA GPU, got {why}")
    index = 0 if dev.index is None else dev.index
    _check_index(index)
    return torch.device("cuda", index)


@dataclass
class StagedBuffer:
    """A device buffer with a pinned host twin: a host feed is written into ``host`` and copied to
    ``device`` asynchronously on the engine's stream; ``copied`` is the event of the last copy.
    (On the CPU ``host`` is None: the feed is copied straight into ``device``.)"""

    device: Any
    host: Any
    copied: Any = None


class Device(Protocol):
    """Buffers, copies and graphs on one stream (``TorchDevice``; a numpy twin in the tests).

    Host synchronisations (the host waiting for the device) are counted in ``host_syncs``:
    ``download`` is one (it returns host data), ``synchronize`` is one, a ``capture`` is one, and an
    ``upload`` is one only if its staging buffer is still being read by an earlier copy (never in
    the engines' steady state: every step ends with the download of ``out``, after which all copies
    are done)."""

    stream_handle: int
    host_syncs: int

    def alloc(self, shape: tuple[int, ...], dtype: str, staged: bool = False) -> Any: ...
    def address(self, buf) -> int: ...
    def zero(self, buf) -> None: ...
    def upload(self, buf, array: np.ndarray) -> None: ...
    def download(self, buf) -> np.ndarray: ...
    def synchronize(self) -> None: ...
    def capture(self, launch: Callable[[int], None]) -> Any: ...
    def replay(self, graph) -> None: ...
    def activate(self) -> contextlib.AbstractContextManager: ...


def _tensor(buf) -> torch.Tensor:
    return buf.device if isinstance(buf, StagedBuffer) else buf


class TorchDevice:
    """``Device`` on a torch device: buffers are torch tensors, one CUDA stream, graphs are
    ``torch.cuda.CUDAGraph``. ``device`` must exist (``parse_device``)."""

    def __init__(self, device: torch.device):
        self.torch_device = device
        self.on_cuda = device.type == "cuda"
        self.stream = None
        if self.on_cuda:
            with torch.cuda.device(device):
                self.stream = torch.cuda.Stream(device)
        self.stream_handle = self.stream.cuda_stream if self.on_cuda else 0
        self.host_syncs = 0
        self._pinned_out: dict[tuple, torch.Tensor] = {}  # download buffers, by shape and dtype

    def hardware(self) -> str:
        """The GPU's name, or the CPU's model name."""
        return torch.cuda.get_device_name(self.torch_device) if self.on_cuda else cpu_name()

    @contextlib.contextmanager
    def activate(self):
        if not self.on_cuda:
            yield
            return
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream):
            yield

    def alloc(self, shape, dtype: str | torch.dtype, staged: bool = False):
        """A zeroed buffer; ``staged``: with a pinned host twin (fp32 for an fp16 / bf16 buffer)."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        with self.activate():
            buf = torch.zeros(tuple(shape), dtype=dtype, device=self.torch_device)
        if not staged:
            return buf
        host = None
        if self.on_cuda:
            host = torch.zeros(tuple(shape), dtype=torch.float32 if dtype in _HALF else dtype, pin_memory=True)
        return StagedBuffer(buf, host)

    def address(self, buf) -> int:
        return int(_tensor(buf).data_ptr())

    def zero(self, buf) -> None:
        with self.activate():
            _tensor(buf).zero_()

    def upload(self, buf: StagedBuffer, array: np.ndarray) -> None:
        if not self.on_cuda:
            buf.device.copy_(torch.from_numpy(np.ascontiguousarray(array)))
            return
        if buf.copied is not None and not buf.copied.query():  # the last copy still reads ``host``
            self.host_syncs += 1
            buf.copied.synchronize()
        buf.host.numpy()[...] = array  # a host memcpy into pinned memory
        with self.activate():
            buf.device.copy_(buf.host, non_blocking=True)
            if buf.copied is None:
                buf.copied = torch.cuda.Event()
            buf.copied.record(self.stream)

    def download(self, buf) -> np.ndarray:
        """``buf`` on the host (fp16 / bf16 as fp32): one host synchronisation."""
        self.host_syncs += 1
        with self.activate():
            src = _tensor(buf)
            src = src.float() if src.dtype in _HALF else src
            if not self.on_cuda:
                return src.numpy().copy()
            key = (tuple(src.shape), src.dtype)
            if key not in self._pinned_out:
                self._pinned_out[key] = torch.empty(key[0], dtype=src.dtype, pin_memory=True)
            host = self._pinned_out[key]
            host.copy_(src, non_blocking=True)
        self.stream.synchronize()
        return host.numpy().copy()

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device, without a host synchronisation (pinned memory, asynchronous copy)."""
        if not self.on_cuda:
            return torch.from_numpy(array.copy())
        with self.activate():
            return torch.from_numpy(array).pin_memory().to(self.torch_device, non_blocking=True)

    def synchronize(self) -> None:
        self.host_syncs += 1
        if self.stream is not None:
            self.stream.synchronize()

    def capture(self, launch: Callable[[int], None]) -> torch.cuda.CUDAGraph:
        """A CUDA graph of what ``launch(stream_handle)`` enqueues (recorded, not run)."""
        if not self.on_cuda:
            raise EngineError(f"CUDA graphs need a CUDA device, got {self.torch_device}")
        graph = torch.cuda.CUDAGraph()
        self.host_syncs += 1  # torch.cuda.graph synchronizes the device before it captures (once per graph)
        with self.activate(), torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            launch(self.stream_handle)
        return graph

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        with self.activate():
            graph.replay()
