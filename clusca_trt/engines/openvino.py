"""OpenVINO engines: a build's ONNX graphs compiled by OpenVINO Runtime for its CPU plugin, with the
state in host arrays bound once to each graph's infer request as shared-memory tensors.

    <graph>.onnx -> ov.Core.compile_model(path, "CPU", config) -> one infer request per graph

Precision (``choose_precision``): the model graphs (cond, plain, full, partial, forecast) run at the
inference precision asked for, by default bf16 where OpenVINO reports bf16 units on this CPU
(``OPTIMIZATION_CAPABILITIES`` lists ``BF16``: AVX512-BF16 or AMX), fp32 elsewhere; a precision the
CPU has no units for is refused (OpenVINO would silently run fp32). The clustering and selection
graphs always run at fp32 inference precision. Every graph's inputs and outputs stay float32 /
int64 as exported, so the state is the same host arrays whatever the precision; after compiling,
each graph's ``INFERENCE_PRECISION_HINT`` is read back and must be the one asked for.

State (``engines.base``): one numpy array per state tensor, wrapped once in an ``ov.Tensor`` that
shares its memory and bound to the ports of every graph that reads or writes it; OpenVINO reads
and writes those arrays in place (no copy in or out). A state tensor some graph both reads and
writes (``pingpong``) has two arrays: the graph reads one and writes the other, and the two swap
after the call; a port is re-bound (``set_tensor`` with one of the two tensors made at load time,
never a new one) only where its graph last saw the other array. Host feeds are wrapped per call
as shared-memory tensors over the caller's arrays (no copy); ``out`` is written into an array
bound once and copied to the caller.

Compiled-model cache: ``CACHE_DIR`` in the engine directory (``<engine>/openvino-cache``): a second
load imports each compiled graph instead of compiling it (``loaded_from_cache`` says which did).
OpenVINO keys its blobs by the graph file, the configuration and the device; build folders are
immutable, so a rebuild gets new blobs and never reads stale ones.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, EngineError
from ..spec import OUT, WEIGHTED_GRAPHS, ExportSpec
from .base import NP_DTYPES, EngineInfo, StepEngine, cpu_name

log = logging.getLogger(__name__)

CACHE_DIR = "openvino-cache"  # in the engine directory: OpenVINO's compiled-model cache
DEVICE = "CPU"
# our precision -> OpenVINO's inference precision hint, and the capability its CPU plugin reports for it
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}


def require_openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(
            f"the openvino backend needs OpenVINO Runtime: expected the openvino package, got {e}; "
            f"pip install openvino") from None
    return openvino


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU computes fast (``FP32``, ``BF16``, ``FP16``, ``INT8``, ...)."""
    ov = require_openvino()
    return tuple(str(c) for c in ov.Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def choose_precision(requested: str | None, capabilities: tuple[str, ...] | list[str]) -> str:
    """The model graphs' inference precision: ``requested`` (None: bf16 where the CPU has bf16
    units, else fp32), refused where the CPU has no units for it. A pure decision (table-tested)."""
    if requested is None:
        return "bf16" if CAPABILITY["bf16"] in capabilities else "fp32"
    if requested not in HINTS:
        raise EngineError(f"openvino precision must be one of {', '.join(HINTS)}, got {requested!r}")
    if requested != "fp32" and CAPABILITY[requested] not in capabilities:
        raise BackendUnavailableError(
            f"openvino precision {requested} needs a CPU with {CAPABILITY[requested]} units: expected "
            f"{CAPABILITY[requested]} among OpenVINO's CPU capabilities, got {', '.join(capabilities) or 'none'} "
            f"({cpu_name()}); choose --precision fp32")
    return requested


def graph_config(graph: str, precision: str, threads: int | None, cache_dir: Path | None) -> dict:
    """The CPU plugin's configuration of one graph: latency (one stream), the inference precision
    (the model graphs: ``precision``; clustering and selection: fp32), threads, the cache folder.

    Threads are not pinned to cores: the graphs of a step take turns, each compiled model with its
    own stream threads, and a pinned thread waits for its own core while another is idle (measured
    on dit-digits, 2 shared cores: a selection call right after a full call 2.6 ms pinned, 0.2 ms not)."""
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": HINTS[precision if graph in WEIGHTED_GRAPHS else "fp32"],
        "ENABLE_CPU_PINNING": False,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


class _Buffer:
    """A host array and the shared-memory ``ov.Tensor`` over it, made once."""

    __slots__ = ("array", "tensor")

    def __init__(self, ov, shape, dtype: str):
        self.array = np.zeros(shape, NP_DTYPES[dtype])
        self.tensor = ov.Tensor(self.array, shared_memory=True)


class OpenVinoEngine(StepEngine):
    backend = "openvino"

    def __init__(
        self,
        spec: ExportSpec,
        graph_paths: dict[str, Path],
        precision: str | None = None,
        threads: int | None = None,
        cache_dir: Path | None = None,
    ):
        ov = require_openvino()
        self._ov = ov
        precision = choose_precision(precision, cpu_capabilities())
        super().__init__(spec, EngineInfo(self.backend, "cpu", precision, None, cpu_name()))
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir
        self.threads = threads
        core = ov.Core()
        self.compiled = {}
        #: graphs whose compiled model was imported from the cache (``LOADED_FROM_CACHE``)
        self.loaded_from_cache: dict[str, bool] = {}
        for name, path in graph_paths.items():
            config = graph_config(name, precision, threads, cache_dir)
            try:
                compiled = core.compile_model(str(path), DEVICE, config)
            except Exception as e:
                raise EngineError(
                    f"engine file {Path(path).name} cannot be compiled by OpenVINO "
                    f"({type(e).__name__}: {e}".splitlines()[0][:300] + "); rebuild with clusca-trt build"
                ) from e
            ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16, f16
            want = precision if name in WEIGHTED_GRAPHS else "fp32"
            if ran != HINTS[want]:
                raise EngineError(f"graph {name}: expected OpenVINO to compile it at {HINTS[want]} inference precision, "
                                  f"got {ran}")
            self.compiled[name] = compiled
            self.loaded_from_cache[name] = _loaded_from_cache(compiled)
        # the state (two buffers for a ping-pong tensor, the current one is _parity[name]) and the outputs
        self._buffers: dict[str, list[_Buffer]] = {
            n: [_Buffer(ov, t.shape, t.dtype) for _ in range(2 if n in self.pingpong else 1)]
            for n, t in self.state_specs.items()
        }
        self._parity: dict[str, int] = {n: 0 for n in self._buffers}
        self._reads = {name: frozenset(t.name for t in g.inputs) for name, g in spec.graphs.items()}
        self._out: dict[str, _Buffer] = {}
        self.requests = {}
        self._ports: dict[str, dict[str, object]] = {}  # graph -> tensor name -> its port
        self._bound: dict[tuple[str, str], int] = {}  # (graph, port name) -> index of the state buffer bound there
        #: set_tensor calls by kind: "state" (at load), "swap" (a ping-pong port re-bound), "feed" (host inputs)
        self.binds: Counter = Counter()
        for name, g in spec.graphs.items():
            request = self.compiled[name].create_infer_request()
            self.requests[name] = request
            ports = {}
            for p in list(self.compiled[name].inputs) + list(self.compiled[name].outputs):
                for n in p.get_names():
                    ports[n] = p
            missing = [t.name for t in g.inputs + g.outputs if t.name not in ports]
            if missing:
                raise EngineError(f"graph {name}: expected ports {', '.join(missing)} in its compiled model, got "
                                  f"{', '.join(sorted(ports))}; rebuild with clusca-trt build")
            self._ports[name] = ports
            for t in g.inputs:
                if t.name in self._buffers:
                    self._bind(name, t.name, t.name, self._parity[t.name], "state")
            for t in g.outputs:
                if t.name == OUT:
                    self._out[name] = _Buffer(ov, t.shape, t.dtype)
                    request.set_tensor(ports[OUT], self._out[name].tensor)
                    self.binds["state"] += 1
                else:
                    self._bind(name, t.name, t.state_name, self._write_index(name, t.state_name), "state")
        cached = sum(self.loaded_from_cache.values())
        log.info("OpenVINO engine on %s, %s (%d of %d graphs from the compiled-model cache)",
                 cpu_name(), precision, cached, len(self.compiled))

    # -- binding ------------------------------------------------------------------------------
    def _write_index(self, graph: str, state: str) -> int:
        """The buffer ``graph`` writes state ``state`` into: the spare where it also reads it, else the current."""
        reads = state in self._reads[graph]
        return 1 - self._parity[state] if reads and state in self.pingpong else self._parity[state]

    def _bind(self, graph: str, port: str, state: str, index: int, kind: str) -> None:
        """Bind buffer ``index`` of state ``state`` to ``port`` of ``graph`` (a tensor made at load time)."""
        self.requests[graph].set_tensor(self._ports[graph][port], self._buffers[state][index].tensor)
        self._bound[graph, port] = index
        self.binds[kind] += 1

    # -- the contract -------------------------------------------------------------------------
    def reset(self) -> None:
        for n, buffers in self._buffers.items():
            buffers[self._parity[n]].array.fill(0)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        g = self.spec.graphs[graph]
        self.check_feeds(g, feeds)
        request = self.requests[graph]
        ports = self._ports[graph]
        written = []
        for t in g.inputs:
            if t.name in self._buffers:
                if self._bound[graph, t.name] != self._parity[t.name]:
                    self._bind(graph, t.name, t.name, self._parity[t.name], "swap")
            else:  # a host feed: a tensor over the caller's array, no copy (a read-only array is copied)
                a = np.ascontiguousarray(feeds[t.name])
                request.set_tensor(ports[t.name], self._ov.Tensor(a if a.flags.writeable else a.copy(),
                                                                  shared_memory=True))
                self.binds["feed"] += 1
        for t in g.outputs:
            if t.name == OUT:
                continue
            index = self._write_index(graph, t.state_name)
            if self._bound[graph, t.name] != index:
                self._bind(graph, t.name, t.state_name, index, "swap")
            if index != self._parity[t.state_name]:
                written.append(t.state_name)
        request.infer()
        for n in written:
            self._parity[n] = 1 - self._parity[n]
        if graph not in self._out:
            return None
        self.host_syncs += 1
        return self._out[graph].array.copy()

    def read_state(self, name: str) -> np.ndarray:
        return self._buffers[name][self._parity[name]].array.copy()

    def state_array(self, name: str) -> np.ndarray:
        """The host array that holds state ``name`` now (no copy; tests check what the requests bind)."""
        return self._buffers[name][self._parity[name]].array

    def state_arrays(self) -> dict[str, list[np.ndarray]]:
        """Every state array the engine allocated, by state tensor (two for a ping-pong tensor)."""
        return {n: [b.array for b in buffers] for n, buffers in self._buffers.items()}

    def memory(self) -> dict[str, int]:
        return {"state": self.state_bytes(),
                "outputs": sum(b.array.nbytes for b in self._out.values())}

    def close(self) -> None:
        self.requests.clear()
        self.compiled.clear()
        self._buffers.clear()
        self._out.clear()


def _loaded_from_cache(compiled) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # a plugin without the property: unknown counts as compiled here
        return False
