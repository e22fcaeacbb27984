"""engines/tensorrt.py: the TensorRT plans of an engine directory -> a StepEngine on the GPU.

The plans are built by ``exporters.trt_build`` (``clusca-trt build --backend tensorrt``);
``load_engine`` refuses plans built for another TensorRT version, GPU or precision rewrite before
reading them (``trt_plan.check_platform``), deserializes each with Polygraphy and holds its I/O to
the spec (``trt_plan.check_plan_io``).

Run (``TensorRTEngine``): one execution context per plan (``PlanContext``), bound to device buffers
with ``set_tensor_address`` and launched with ``execute_async_v3`` on one CUDA stream
(``cuda.TorchDevice``, shared with the torch engine). The state (module caches, hidden states,
centroids, assignments, fresh indices) lives on the GPU for the whole sampling run in the plans'
types; a tensor that one graph both reads and writes (the caches, the centroids:
``base.pingpong_state``) has two buffers that swap after the call, every other one buffer. Graphs
without a host output (cluster, select) are queued and launched with the next graph that has one,
so the partial step's sequence (select -> partial) is one unit; that unit is captured once as a
CUDA graph per address set (``cuda_graph.GraphCache``) and replayed. Host feeds are written into
pinned host buffers and copied asynchronously on the engine's stream; ``out`` is the only tensor
that comes back, once per step, and its download is the step's one host synchronisation
(``host_syncs``, the device's count).

TensorRT and Polygraphy's TensorRT backend are needed by ``load_engine`` alone, and imported there
(``import clusca_trt`` and every CPU path work without them); the engine itself runs on any
``cuda.Device`` (its CPU tests use a numpy twin).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import numpy as np

from ..errors import EngineError, describe
from ..spec import OUT, STATE_SUFFIX, ExportSpec
from .base import BYTES, EngineInfo, StepEngine, returns_out
from .cuda import Device, TorchDevice, parse_device
from .cuda_graph import Action, CaptureConfig, GraphCache, GraphKey
from .manifest import Manifest
from .trt_plan import (TensorIO, check_plan_io, check_platform, current_platform, engine_io, on_device,
                       polygraphy_output, require_tensorrt)

log = logging.getLogger(__name__)


class Plan(Protocol):
    """What the engine needs of one plan: its I/O tensors, a device address bound to a tensor, a
    launch on a stream (``PlanContext``; the CPU tests' plans are ONNX Runtime sessions)."""

    name: str
    tensors: dict[str, TensorIO]

    def set_address(self, tensor: str, address: int) -> None: ...
    def launch(self, stream_handle: int) -> None: ...


class PlanContext:
    """A deserialized plan (``trt.ICudaEngine``) and its own execution context (static shapes: no
    profiles to set)."""

    def __init__(self, name: str, engine):
        self.name = name
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for the {name} plan (out of GPU memory?)")
        self.tensors = engine_io(engine)

    def set_address(self, tensor: str, address: int) -> None:
        if not self.context.set_tensor_address(tensor, address):
            raise EngineError(f"TensorRT refused the device address of {tensor} in the {self.name} plan")

    def launch(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise EngineError(f"TensorRT execution of the {self.name} plan failed (see the log)")


class TensorRTEngine(StepEngine):
    """Step graphs as TensorRT plans; the state stays on the device. Use as a context manager.

    ``plans``: a ``Plan`` per graph of ``spec``; ``device``: where they run (``cuda.Device``).
    Host synchronisations per step: one, the download of ``out`` (``host_syncs``: the device's
    count). Host feeds are written into pinned staging buffers and copied asynchronously on the
    engine's stream; graphs without ``out`` are queued and launched with the next one that has it.
    """

    backend = "tensorrt"

    def __init__(
        self,
        spec: ExportSpec,
        plans: dict[str, Plan],
        device: Device,
        cuda_graphs: CaptureConfig | bool = True,
        info: EngineInfo | None = None,
    ):
        self.device = device  # its ``host_syncs`` are the engine's
        super().__init__(spec, info or EngineInfo(self.backend, "cuda:0", "fp32"))
        self.plans = plans
        if isinstance(cuda_graphs, bool):
            cuda_graphs = CaptureConfig(enabled=cuda_graphs)
        self.graphs = GraphCache(cuda_graphs)
        missing = [g for g in spec.graphs if g not in plans]
        if missing:
            raise EngineError(f"expected a plan for every graph, got none for {missing[0]}; rebuild")
        for name, plan in plans.items():
            check_plan_io(spec, name, plan.tensors)
        self._dtypes = self._buffer_dtypes()
        self._queue: list[tuple[str, dict[str, int]]] = []
        self._alloc_all()
        log.info("TensorRT engine on %s (CUDA graphs %s, state %.1f MiB)", self.info,
                 "on" if cuda_graphs.enabled else "off", self.state_bytes() / 2**20)

    def _buffer_dtypes(self) -> dict[str, str]:
        """dtype of every state tensor and output buffer, from the plans (must agree across plans)."""
        seen: dict[str, str] = {}
        for name, plan in self.plans.items():
            for tio in plan.tensors.values():
                state = tio.name.removesuffix(STATE_SUFFIX)
                key = state if state in self.state_specs else f"{name}:{tio.name}"
                if key in seen and seen[key] != tio.dtype:
                    raise EngineError(f"plans disagree on the type of {key}: {seen[key]} and {tio.dtype}; rebuild")
                seen[key] = tio.dtype
        return seen

    @property
    def host_syncs(self) -> int:
        """The host's waits for the device: the device counts them (downloads, captures, waiting uploads)."""
        return self.device.host_syncs

    def _dtype(self, key: str, spec_dtype: str) -> str:
        return self._dtypes.get(key, spec_dtype)

    def _alloc_all(self) -> None:
        """Every device buffer, anew: one per state tensor and a spare for those a graph both reads
        and writes (``pingpong``), ``out`` per graph, one staged (pinned host + device) buffer per
        host input. Graphs captured with the old buffers are dropped."""
        d = self.device
        with d.activate():
            self._state = {n: d.alloc(t.shape, self._dtype(n, t.dtype)) for n, t in self.state_specs.items()}
            self._spare = {n: d.alloc(t.shape, self._dtype(n, t.dtype))
                           for n, t in self.state_specs.items() if n in self.pingpong}
            self._home = dict(self._state)  # where each ping-pong pair starts a run (``reset``)
            self._out = {}
            self._feeds = {}
            for name, g in self.spec.graphs.items():
                for t in g.outputs:
                    if t.name == OUT:
                        self._out[name] = d.alloc(t.shape, self._dtype(f"{name}:{OUT}", t.dtype))
                for t in self.host_inputs(name):
                    self._feeds[name, t.name] = d.alloc(t.shape, self._dtype(f"{name}:{t.name}", t.dtype), staged=True)
            d.synchronize()
        dropped = self.graphs.invalidate()
        if dropped:
            log.info("device buffers reallocated: %d captured CUDA graphs dropped", dropped)

    def state_bytes(self) -> int:
        """Device bytes of the state, spares included."""
        return sum(int(np.prod(t.shape)) * BYTES.get(self._dtype(n, t.dtype), 4) * (2 if n in self.pingpong else 1)
                   for n, t in self.state_specs.items())

    def reallocate(self) -> None:
        """Free and allocate every device buffer anew (the state is lost, as after ``reset``).
        Captured CUDA graphs refer to the old buffers: they are dropped and re-captured."""
        with self.device.activate():
            self._flush()
            self.device.synchronize()
        self._alloc_all()

    def reset(self) -> None:
        """Zero the state, and put every ping-pong pair back in its first-run order: each run binds
        the same addresses whatever its number of swaps (a plain last step swaps nothing), so its
        captured CUDA graphs replay on the next run."""
        with self.device.activate():
            self._flush()
            for n in self.pingpong:
                if self._state[n] is not self._home[n]:
                    self._state[n], self._spare[n] = self._spare[n], self._state[n]
            for buf in self._state.values():
                self.device.zero(buf)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        g = self.spec.graphs[graph]
        self.check_feeds(g, feeds)
        with self.device.activate():
            return self._run(graph, g, feeds)

    def _run(self, graph, g, feeds) -> np.ndarray | None:
        if any(name == graph for name, _ in self._queue):
            self._flush()  # its staged feed buffers are about to be overwritten
        plan = self.plans[graph]
        bind: dict[str, int] = {}
        for t in g.inputs:
            if t.name in self._state:
                buf = self._state[t.name]
            else:
                buf = self._feeds[graph, t.name]
                self.device.upload(buf, feeds[t.name])  # asynchronous, on the engine's stream
            if t.name in plan.tensors:  # TensorRT drops network inputs a graph does not use
                bind[t.name] = self.device.address(buf)
        swapped = []
        for t in g.outputs:
            if t.name == OUT:
                buf = self._out[graph]
            elif t.state_name in self._spare:  # read and written by this graph: write the other buffer
                buf = self._spare[t.state_name]
                swapped.append(t.state_name)
            else:  # no graph reads what this one writes here while it runs: in place
                buf = self._state[t.state_name]
            bind[t.name] = self.device.address(buf)
        for n in swapped:  # ping-pong: what was written is the state for every graph queued after this one
            self._state[n], self._spare[n] = self._spare[n], self._state[n]
        self._queue.append((graph, bind))
        if not returns_out(g):
            return None  # launched with the next graph that returns ``out`` (or on read_state/reset)
        self._flush()
        return np.asarray(self.device.download(self._out[graph]), dtype=np.float32)  # the step's one host sync

    def _flush(self) -> None:
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        key = GraphKey(
            tuple(name for name, _ in queue),
            tuple(tuple(self.plans[name].tensors[t].shape) for name, bind in queue for t in sorted(bind)),
            tuple(bind[t] for _, bind in queue for t in sorted(bind)),
        )
        action = self.graphs.plan(key)
        graph = None
        if action is Action.REPLAY:
            self.device.replay(self.graphs.graph(key))
        elif action is Action.CAPTURE:
            self._bind(queue)
            try:
                graph = self.device.capture(lambda stream: self._launch(queue, stream))
            except Exception as e:  # a plan that cannot be captured: run everything eagerly from now on
                log.warning("CUDA-graph capture of %s failed (%s); running without CUDA graphs",
                            "+".join(key.sequence), describe(e))
                self.graphs.disable()
                self._launch(queue, self.device.stream_handle)
                return
            self.device.replay(graph)
        else:
            self._bind(queue)
            self._launch(queue, self.device.stream_handle)
        self.graphs.done(key, action, graph)

    def _bind(self, queue) -> None:
        for name, bind in queue:
            plan = self.plans[name]
            for tensor, address in bind.items():
                plan.set_address(tensor, address)

    def _launch(self, queue, stream_handle: int) -> None:
        for name, _ in queue:
            self.plans[name].launch(stream_handle)

    def read_state(self, name: str) -> np.ndarray:
        with self.device.activate():
            self._flush()
            return np.asarray(self.device.download(self._state[name]))

    def close(self) -> None:
        self._queue.clear()
        with contextlib.suppress(Exception), self.device.activate():
            self.device.synchronize()
        self.graphs.invalidate()
        self._state, self._spare, self._out, self._feeds = {}, {}, {}, {}
        self.plans = {}


def load_engine(
    manifest: Manifest, device: int = 0, cuda_graphs: CaptureConfig | bool = True, verify: bool = True
) -> TensorRTEngine:
    """The TensorRT engine of an engine directory built with ``--backend tensorrt``, on CUDA device
    ``device`` (current while the plans are deserialized and their contexts created). Refuses plans
    built for another TensorRT version, GPU or precision rewrite before reading them."""
    require_tensorrt()
    section = manifest.data.get("tensorrt")
    if not section:
        raise EngineError(
            f"expected TensorRT plans in {manifest.directory}, got none; build them with clusca-trt build --backend tensorrt"
        )
    check_platform(section, current_platform(device), manifest.directory)
    if verify:
        manifest.verify(hashes=True)
    from polygraphy.backend.trt import EngineFromBytes

    plans = {}
    with on_device(device):
        for name, entry in section["plans"].items():
            path = manifest.plan_path(entry["file"])
            with polygraphy_output(f"loading TensorRT plan {path.name}"):
                engine = EngineFromBytes(path.read_bytes())()
            plans[name] = PlanContext(name, engine)
    cuda = TorchDevice(parse_device(f"cuda:{device}"))
    info = EngineInfo("tensorrt", f"cuda:{device}", section["options"]["precision"], None, cuda.hardware())
    return TensorRTEngine(manifest.spec, plans, cuda, cuda_graphs, info=info)
