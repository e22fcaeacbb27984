"""engines/torch_backend.py: a model adapter + its ExportSpec -> a StepEngine that runs the step
graphs as PyTorch modules (the same modules the exporter traces).

    TorchEngine(adapter, spec, device="cpu" | "cuda" | "cuda:N", precision="fp32" | "bf16" | "fp16")

It is the PyTorch reference of clusca-trt (in fp32 on the CPU, the test oracle of the ONNX
engines) and a GPU backend:

* weights in the precision (the adapter's parameters are cast in place: shared, not copied); the
  model graphs (full, partial, forecast) run under ``torch.autocast`` in that precision (matrix
  products in bf16 / fp16; on CUDA, normalisation, softmax and the other ops of autocast's fp32
  list in fp32);
* state in static device buffers allocated once from the spec: the module caches in the
  precision, everything else as the spec says: hidden states, centroids and distances in fp32,
  so k-means and the fresh-token selection run in fp32 (the cluster and select graphs run
  without autocast; a bf16 k-means flips assignments, see ``tests/engines/test_torch_engine.py``);
  the Taylor coefficients and the forecast sums are computed in fp32 from the stored factors;
* one static device buffer per host input of every graph: a feed is copied into it (on CUDA from
  a pinned host buffer, asynchronously on the engine's stream), and ``out`` comes back through a
  pinned buffer: that download is a step's one host synchronisation (``host_syncs`` counts them).
  Stream, staging, downloads and graph capture are ``cuda.TorchDevice``'s, shared with the
  TensorRT engine;
* on CUDA every graph is captured once as a CUDA graph (``torch.cuda.CUDAGraph``): its first call
  runs eagerly on the engine's stream (warm-up: cuBLAS handles and workspaces, autotuning), the
  second is captured on that stream and replayed from then on, reading and writing only the static
  buffers; ``cuda_graph.GraphCache`` keys each graph by its buffers' addresses and drops it where
  they change. A graph that cannot be captured makes the engine run eagerly, with a warning.

* ``run_loop``: a chunk's whole sampling loop on the device (``runtime.device_loop`` gives it every
  step's graphs and feeds, drawn up front, and guidance plus the sampler step in torch): the feeds
  are uploaded once, the latents stay on the device, and the final latents are the loop's one host
  synchronisation. The runtime uses it wherever ``device_loop`` is on (the default); off, the engine
  runs step by step like the others, one synchronisation per step.

The same code runs on the CPU without graphs (torch runs bf16 and fp16 on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from ..errors import ConfigError, InputError, describe
from ..spec import OUT, WEIGHTED_GRAPHS, ExportSpec
from ..steps import graph_module
from .base import NP_DTYPES, EngineInfo, StepEngine
from .cuda import DTYPES, TorchDevice, parse_device
from .cuda_graph import Action, CaptureConfig, GraphCache, GraphKey

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """The floating-point parameters of ``module`` in ``dtype``, in place. Buffers keep their type
    (FLUX's rotary tables stay fp32, as diffusers keeps them)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


class TorchEngine(StepEngine):
    backend = "torch"

    def __init__(
        self,
        adapter,
        spec: ExportSpec,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cuda_graphs: CaptureConfig | bool = True,
    ):
        self.device = TorchDevice(parse_device(device))  # its ``host_syncs`` are the engine's
        self.dtype = check_precision(precision)
        on_cuda = self.device.on_cuda
        where = self.device.torch_device
        super().__init__(spec, EngineInfo(self.backend, str(where), precision, None, self.device.hardware()))
        if isinstance(cuda_graphs, bool):
            cuda_graphs = CaptureConfig(enabled=cuda_graphs)
        # every graph is captured (a key per graph; warm-up 1: the first call runs eagerly)
        self.graphs = GraphCache(CaptureConfig(enabled=cuda_graphs.enabled and on_cuda, warmup=max(cuda_graphs.warmup, 1),
                                               capture=frozenset(spec.graphs), max_graphs=max(len(spec.graphs), 1)))
        self.device_loop = True  # the runtime may run a whole chunk's loop here (``run_loop``); False: step by step
        with self.device.activate():
            adapter = adapter.to(where)
            if self.dtype != torch.float32:
                cast_parameters(adapter, self.dtype)
            self.adapter = adapter
            self.modules = {n: graph_module(adapter, spec, n) for n in spec.graphs}
            self._alloc()
        log.info("torch engine on %s (%s, CUDA graphs %s, state %.1f MiB)", where, precision,
                 "on" if self.graphs.config.enabled else "off", self.state_bytes() / 2**20)

    @property
    def host_syncs(self) -> int:
        """The host's waits for the device: the device counts them (downloads, captures)."""
        return self.device.host_syncs

    # -- buffers ------------------------------------------------------------------------------
    def state_dtype(self, name: str) -> torch.dtype:
        """The module caches in the precision; hidden states, centroids, distances, indices as specified."""
        t = self.state_specs[name]
        if t.dtype == "float32" and name in self._caches:
            return self.dtype
        return DTYPES[t.dtype]

    def _alloc(self) -> None:
        """Every static buffer, once: state, host inputs (staged: with pinned twins on CUDA), ``out``."""
        self._caches = {t.name for t in self.spec.cache_tensors()}
        dev = self.device
        with torch.inference_mode():
            self._state = {n: dev.alloc(t.shape, self.state_dtype(n)) for n, t in self.state_specs.items()}
            self._staged = {(name, t.name): dev.alloc(t.shape, t.dtype, staged=True)
                            for name in self.spec.graphs for t in self.host_inputs(name)}
            self._inputs: dict[tuple[str, str], torch.Tensor] = {k: b.device for k, b in self._staged.items()}
            self._out: dict[str, torch.Tensor] = {name: dev.alloc(t.shape, torch.float32)
                                                  for name, g in self.spec.graphs.items()
                                                  for t in g.outputs if t.name == OUT}
        self._keys = {name: self._key(name) for name in self.spec.graphs}
        self.graphs.invalidate()

    def _key(self, graph: str) -> GraphKey:
        bufs = self._bound(graph) + [self._out[graph]] if graph in self._out else self._bound(graph)
        bufs += [self._state[t.state_name] for t in self.spec.graphs[graph].outputs if t.name != OUT]
        return GraphKey((graph,), tuple(tuple(b.shape) for b in bufs), tuple(int(b.data_ptr()) for b in bufs))

    def _bound(self, graph: str) -> list[torch.Tensor]:
        """The buffers a graph reads, in the spec's input order."""
        return [self._state[t.name] if t.name in self._state else self._inputs[graph, t.name]
                for t in self.spec.graphs[graph].inputs]

    def state_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._state.values())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.adapter.parameters())

    def memory(self) -> dict:
        """Bytes on the device: weights, state, and on CUDA the allocator's peak since the last reset."""
        out = {"weights": self.weight_bytes(), "state": self.state_bytes()}
        if self.device.on_cuda:
            out["peak_allocated"] = int(torch.cuda.max_memory_allocated(self.device.torch_device))
            out["reserved"] = int(torch.cuda.memory_reserved(self.device.torch_device))
        return out

    def graph_flops(self) -> dict[str, int]:
        """FLOPs of one call of every graph, as ``torch.utils.flop_counter`` counts them: matrix
        products, convolutions and attention (element-wise work is not counted). Runs each graph once
        on the current buffers, eagerly; nothing is written back."""
        from torch.utils.flop_counter import FlopCounterMode

        out = {}
        with self.device.activate(), torch.inference_mode():
            for name, module in self.modules.items():
                low = name in WEIGHTED_GRAPHS and self.dtype != torch.float32
                with FlopCounterMode(display=False) as counter, torch.autocast(
                        self.device.torch_device.type, dtype=self.dtype, enabled=low, cache_enabled=False):
                    module(*self._bound(name))
                out[name] = int(counter.get_total_flops())
        return out

    # -- running ------------------------------------------------------------------------------
    def reset(self) -> None:
        with self.device.activate(), torch.inference_mode():
            for buf in self._state.values():
                self.device.zero(buf)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        g = self.spec.graphs[graph]
        self.check_feeds(g, feeds)
        with self.device.activate(), torch.inference_mode():
            for t in self.host_inputs(graph):
                self.device.upload(self._staged[graph, t.name], feeds[t.name])  # asynchronous on CUDA
            self._launch(graph)
            return self.device.download(self._out[graph]) if graph in self._out else None  # the step's one sync

    def _launch(self, graph: str) -> None:
        key = self._keys[graph]
        action = self.graphs.plan(key)
        if action is Action.REPLAY:
            self.device.replay(self.graphs.graph(key))
        elif action is Action.CAPTURE:
            try:
                cuda_graph = self.device.capture(lambda _stream: self._compute(graph))
            except Exception as e:  # something in the step cannot be captured: run eagerly from now on
                log.warning("CUDA-graph capture of the %s graph failed (%s); the torch engine runs without CUDA graphs",
                            graph, describe(e))
                self.graphs.disable()
                self._compute(graph)
                return
            self.device.replay(cuda_graph)
            self.graphs.done(key, action, cuda_graph)
            return
        else:
            self._compute(graph)
        self.graphs.done(key, action)

    def _compute(self, graph: str) -> None:
        """One graph on the static buffers: read them, compute, write ``out`` and the state back."""
        args = self._bound(graph)
        low = graph in WEIGHTED_GRAPHS and self.dtype != torch.float32
        with torch.autocast(self.device.torch_device.type, dtype=self.dtype, enabled=low, cache_enabled=False):
            values = self.modules[graph](*args)
        reads = {a.untyped_storage().data_ptr() for a in args}
        for t, value in zip(self.spec.graphs[graph].outputs, values):
            if value.untyped_storage().data_ptr() in reads:  # an output that is an input: copy before writing
                value = value.clone()
            dst = self._out[graph] if t.name == OUT else self._state[t.state_name]
            dst.copy_(value)

    # -- the whole loop on the device ------------------------------------------------------------
    def run_loop(
        self,
        x0: np.ndarray,
        steps: list[list[tuple[str, dict[str, np.ndarray]]]],
        dynamic: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        update: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """A whole sampling loop of one chunk on the device, with one host synchronisation: the download
        of the final latents.

        ``steps[s]``: the graphs step ``s`` runs, in order, with their host feeds (the denoiser's
        ``ScheduledDenoiser.calls``: coefficients, random keys, k-means starts, timesteps, labels,
        embeddings), every model input that depends on the latents left out. Those feeds are uploaded
        once before the loop (a feed that does not change is copied into its graph's static buffer once;
        the others are stacked and copied in on the device, step by step). ``dynamic(x)`` gives the
        latents-dependent model inputs (DiT: ``x`` twice for guidance), ``update(s, x, out)`` the next
        latents from the graph output (guidance and the sampler, in torch on the device)."""
        with self.device.activate(), torch.inference_mode():
            x = self.to_device(np.ascontiguousarray(x0, dtype=np.float32))
            names = set(dynamic(x))
            constant, stacked = self._stage(steps, names)
            for key, value in constant.items():
                self._inputs[key].copy_(value)
            taken: dict[tuple[str, str], int] = dict.fromkeys(stacked, 0)
            for s, calls in enumerate(steps):
                inputs = dynamic(x)
                out = None
                for graph, _ in calls:
                    for name, value in inputs.items():
                        if (graph, name) in self._inputs:
                            self._inputs[graph, name].copy_(value)
                    for t in self.host_inputs(graph):
                        key = (graph, t.name)
                        if key in stacked:
                            self._inputs[key].copy_(stacked[key][taken[key]])
                            taken[key] += 1
                    self._launch(graph)
                    out = self._out[graph] if graph in self._out else out
                if out is None:
                    raise ConfigError(f"step {s} of the loop runs no graph that returns out")
                x = update(s, x, out)
                if progress:
                    progress(s)
            return self.device.download(x.float())  # the loop's one host synchronisation

    def _stage(self, steps, dynamic: set[str]):
        """Every host feed of the loop on the device: (feeds that never change, by (graph, input);
        the others stacked over their calls, by (graph, input))."""
        arrays: dict[tuple[str, str], list[np.ndarray]] = {}
        for s, calls in enumerate(steps):
            for graph, feeds in calls:
                for t in self.host_inputs(graph):
                    if t.name in dynamic:
                        continue
                    if t.name not in feeds:
                        raise InputError(f"step {s}: graph {graph} expects input {t.name!r}, got none")
                    a = feeds[t.name]
                    if tuple(a.shape) != t.shape or a.dtype != NP_DTYPES[t.dtype]:
                        raise InputError(f"step {s}: graph {graph} input {t.name}: expected {t.dtype}{list(t.shape)}, "
                                         f"got {a.dtype}{list(a.shape)}")
                    arrays.setdefault((graph, t.name), []).append(a)
        constant, stacked = {}, {}
        for key, values in arrays.items():
            first = values[0]
            same = all(a is first for a in values) or (
                first.nbytes <= 1 << 20 and all(np.array_equal(a, first) for a in values))
            if same:
                constant[key] = self.to_device(np.ascontiguousarray(first))
            else:
                stacked[key] = self.to_device(np.stack(values))
        return constant, stacked

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device, without a host synchronisation (pinned memory, asynchronous copy)."""
        return self.device.to_device(array)

    def read_state(self, name: str) -> np.ndarray:
        with self.device.activate():
            buf = self._state[name]
            if self.device.stream is not None:
                self.device.stream.synchronize()
            return (buf.float() if buf.is_floating_point() else buf).cpu().numpy()

    def close(self) -> None:
        if self.device.stream is not None:
            with contextlib.suppress(Exception):
                self.device.stream.synchronize()
        self.graphs.invalidate()
