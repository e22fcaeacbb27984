"""The engine contract: what every backend implements and the runtime may use, nothing more.

An engine runs the step graphs of one build (``spec.graphs``: cond, plain, full, partial, forecast,
cluster_<g>, select_<g>) and owns their *state*: every tensor a graph writes except ``out`` (module
caches, conditioning tables, hidden states, centroids, assignments, fresh indices). The state lives
where the backend computes (host memory on the CPU, device memory on a GPU) and never comes back
to the host between steps.

A backend is one file in ``engines/`` with one ``StepEngine`` subclass, opened by
``engines.open.open_engine``. It implements:

* ``reset()``: zero the state before a sampling run;
* ``run(graph, feeds) -> out | None``: bind each graph input from the state when the state has
  it, else from the host ``feeds`` (``host_inputs(graph)`` lists those; ``check_feeds`` checks
  them); an output ``X_out`` replaces state ``X``; ``out`` comes back to the host (the only
  array that does), graphs without ``out`` return None;
* ``read_state(name) -> array``: one state tensor on the host (tests and debugging);
* ``info``: an ``EngineInfo`` saying which backend, provider, device, precision and hardware run it;

and may override, where the backend can do better than the default:

* ``state_bytes()`` and ``memory()``: bytes the engine holds (default: the spec's state, with a
  spare for every ping-pong tensor ``pingpong`` names);
* ``device_loop`` / ``run_loop(...)`` / ``to_device(array)``: a whole chunk's sampling loop on the
  engine's device (the torch backend; default: not available, the runtime runs step by step);
* ``close()``: free what the engine holds (also on ``with`` exit).

``host_syncs`` counts the host's waits for the device (a download of ``out`` is one); backends
whose device is the host count the downloads.
"""

from __future__ import annotations

import abc
import functools
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import EngineError, InputError
from ..spec import OUT, ExportSpec, GraphSpec

NP_DTYPES = {"float32": np.float32, "int64": np.int64}
BYTES = {"float32": 4, "int64": 8, "bfloat16": 2, "float16": 2, "int32": 4, "bool": 1}
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineInfo:
    """Which engine ran a build; each field has one meaning in every backend.

    backend:   onnxruntime, openvino, torch or tensorrt (``open_engine``'s name).
    device:    where the state lives: ``cpu`` or ``cuda:N``.
    precision: of the model graphs' arithmetic: ``fp32``, ``bf16`` or ``fp16`` (k-means and the
               fresh-token selection run in fp32 on every backend).
    provider:  ONNX Runtime's execution provider (``cpu``, ``cuda``, ``tensorrt``); None on the
               other backends, which have no providers.
    hardware:  the processor that computes: the CPU's model name, or the GPU's name.
    """

    backend: str
    device: str
    precision: str
    provider: str | None = None
    hardware: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineError(f"engine precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def __str__(self) -> str:
        """``onnxruntime/cpu cpu fp32 (AMD EPYC)``: the backend (and provider), device, precision, hardware."""
        head = self.backend + (f"/{self.provider}" if self.provider else "")
        return f"{head} {self.device} {self.precision}" + (f" ({self.hardware})" if self.hardware else "")

    def to_dict(self) -> dict:
        return {"backend": self.backend, "device": self.device, "precision": self.precision,
                "provider": self.provider, "hardware": self.hardware}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` says it (``/proc/cpuinfo``'s ``model name``), else the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


class StepEngine(abc.ABC):
    """A set of step graphs with state kept where they run. Use as a context manager.

    Subclasses set ``backend`` and call ``super().__init__(spec, info)``."""

    backend: str = "?"
    #: True where ``run_loop`` runs a whole chunk on the engine's device; a backend that has the
    #: loop may turn it off per engine (the runtime then runs step by step, as on every other backend)
    device_loop: bool = False
    #: the host's waits for the device (a download of ``out`` is one); a backend whose device object
    #: counts them reads that count instead
    host_syncs: int = 0

    def __init__(self, spec: ExportSpec, info: EngineInfo):
        if info.backend != self.backend:
            raise EngineError(f"expected engine info of backend {self.backend}, got {info.backend}")
        self.spec = spec
        self.info = info
        self.state_specs = spec.state_tensors()
        self.pingpong = pingpong_state(spec)

    @property
    def provider(self) -> str | None:
        """ONNX Runtime's execution provider (``info.provider``); None on the other backends."""
        return self.info.provider

    @property
    def precision(self) -> str:
        return self.info.precision

    # -- what the caller feeds ----------------------------------------------------------------
    def host_inputs(self, graph: str) -> list:
        """The inputs of ``graph`` the caller must feed (all others come from the state)."""
        return [t for t in self.spec.graphs[graph].inputs if t.name not in self.state_specs]

    def check_feeds(self, g: GraphSpec, feeds: dict[str, np.ndarray]) -> None:
        for t in g.inputs:
            if t.name in self.state_specs:
                continue
            if t.name not in feeds:
                raise InputError(f"graph {g.name} expects input {t.name!r}, got none")
            a = feeds[t.name]
            if tuple(a.shape) != t.shape or a.dtype != NP_DTYPES[t.dtype]:
                raise InputError(
                    f"graph {g.name} input {t.name}: expected {t.dtype}{list(t.shape)}, "
                    f"got {a.dtype}{list(a.shape)}"
                )

    def has_graph(self, graph: str) -> bool:
        return graph in self.spec.graphs

    # -- what every backend implements --------------------------------------------------------
    @abc.abstractmethod
    def reset(self) -> None:
        """Zero the state (caches, centroids) before a new sampling run."""

    @abc.abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        """Run one graph; returns ``out`` on the host if the graph has it, else None."""

    @abc.abstractmethod
    def read_state(self, name: str) -> np.ndarray:
        """Copy one state tensor to the host (float32 or int64; tests and debugging only)."""

    # -- what a backend may do better ---------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the state, spares included: the spec's types, a spare for each ping-pong tensor."""
        return sum(int(np.prod(t.shape)) * BYTES[t.dtype] * (2 if n in self.pingpong else 1)
                   for n, t in self.state_specs.items())

    def memory(self) -> dict[str, int]:
        """Bytes the engine holds, by kind (``state``; backends that know add ``weights``, peaks)."""
        return {"state": self.state_bytes()}

    def run_loop(
        self,
        x0: np.ndarray,
        steps: list[list[tuple[str, dict[str, np.ndarray]]]],
        dynamic: Callable,
        update: Callable,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """A whole sampling loop of one chunk on the engine's device (where ``device_loop`` is True;
        see ``engines.torch_backend.TorchEngine.run_loop`` for the arguments)."""
        raise EngineError(f"the {self.backend} backend runs graphs step by step, got a request for a device loop")

    def to_device(self, array: np.ndarray):
        """A host array on the engine's device, for ``run_loop``'s update functions."""
        raise EngineError(f"the {self.backend} backend runs graphs step by step, got a request for a device loop")

    def close(self) -> None:
        """Free what the engine holds; it cannot run afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def returns_out(g: GraphSpec) -> bool:
    return any(t.name == OUT for t in g.outputs)


def pingpong_state(spec: ExportSpec) -> frozenset[str]:
    """The state tensors some graph both reads and writes (input ``X``, output ``X_out``: the module
    caches in the full and partial graphs, the centroids in the cluster graph). An engine whose
    graphs must not write what they read (TensorRT, ONNX Runtime, OpenVINO) keeps two buffers of these and
    swaps them after the call; every other state tensor is written by graphs that do not read it
    and needs one buffer."""
    out = set()
    for g in spec.graphs.values():
        reads = {t.name for t in g.inputs}
        out |= {t.state_name for t in g.outputs if t.name != OUT and t.state_name in reads}
    return frozenset(out)
