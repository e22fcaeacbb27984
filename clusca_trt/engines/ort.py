"""ONNX Runtime engines: a provider probe and an IOBinding engine whose state stays in
``OrtValue`` buffers on the provider's device.

``onnxruntime-gpu`` lists the CUDA and TensorRT providers even where their libraries are
missing and then silently falls back to the CPU; ``probe_providers`` creates a tiny session
per provider and keeps only those that really load. Every engine says which provider ran.

State a graph both reads and writes (``pingpong``: a graph that reads ``mlp_f0`` and writes
``mlp_f0_out``) has two buffers: the graph reads one and writes the other, and the two swap after
the call; every other state tensor has one buffer, written in place.

``cuda_graph=True`` (CUDA provider only; opt-in) turns on the provider's CUDA graphs: host feeds
go through static device buffers updated in place, and each set of bound addresses (ping-pong
makes two per graph) gets its own ``gpu_graph_id``, so a graph is never replayed on buffers
other than the ones it was captured with. A graph the provider cannot capture (a node outside
the CUDA provider) runs without.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, EngineError, describe, one_line
from ..spec import OUT, ExportSpec
from .base import NP_DTYPES, EngineInfo, StepEngine, cpu_name
from .cuda_graph import AnnotationIds, GraphKey

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("tensorrt", "cuda", "cpu")
TRT_CACHE_DIR = "ort-tensorrt-cache"  # in the engine directory: the TensorRT provider's engines and timing cache


def tensorrt_provider_options(cache_dir: Path) -> dict:
    """ONNX Runtime's TensorRT provider options: its engines and timing cache kept in ``cache_dir``
    (without them it rebuilds every engine at every load). TF32 is TensorRT's default (on for fp32
    layers); ``NVIDIA_TF32_OVERRIDE=0`` turns it off, as the GPU tests do where they compare at 1e-3."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
    }


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["b"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def probe_providers() -> tuple[str, ...]:
    """The short names (tensorrt, cuda, cpu) of the providers that really create a session here."""
    import onnxruntime as ort

    listed = set(ort.get_available_providers())
    working = []
    model = _probe_model()
    ort.set_default_logger_severity(4)  # a provider whose libraries are missing logs errors: expected here
    try:
        _probe_each(ort, listed, model, working)
    finally:
        ort.set_default_logger_severity(2)
    log.debug("ONNX Runtime providers that load here: %s", working)
    return tuple(working)


def _probe_each(ort, listed: set, model: bytes, working: list) -> None:
    for short in PREFERENCE:
        name = PROVIDERS[short]
        if name not in listed:
            continue
        if short == "cpu":
            working.append(short)
            continue
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                session = ort.InferenceSession(model, so, providers=[name])
            if session.get_providers()[0] == name:
                working.append(short)
        except Exception as e:  # a provider that cannot load is simply not available
            log.debug("provider %s does not load: %s", name, e)


def choose_provider(requested: str = "auto") -> str:
    working = probe_providers()
    if requested == "auto":
        return working[0]
    if requested not in PROVIDERS:
        raise BackendUnavailableError(f"provider must be one of auto, {', '.join(PROVIDERS)}, got {requested!r}")
    if requested not in working:
        raise BackendUnavailableError(
            f"ONNX Runtime provider {requested} does not load on this machine (working: {', '.join(working)}); "
            f"install onnxruntime-gpu with CUDA/TensorRT libraries or choose --provider cpu"
        )
    return requested


def _first_line(e: Exception, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


class OrtEngine(StepEngine):
    backend = "onnxruntime"

    def __init__(
        self,
        spec: ExportSpec,
        graph_paths: dict[str, Path],
        provider: str = "auto",
        threads: int | None = None,
        trt_cache_dir: Path | None = None,
        cuda_graph: bool = False,
    ):
        import onnxruntime as ort

        self._ort = ort
        chosen = choose_provider(provider)
        self._ort_device = "cpu" if chosen == "cpu" else "cuda"  # where OrtValues live
        super().__init__(spec, EngineInfo(self.backend, "cpu" if chosen == "cpu" else "cuda:0", "fp32", chosen,
                                          cpu_name() if chosen == "cpu" else ""))
        providers: list = [PROVIDERS[self.provider]]
        if self.provider == "tensorrt":
            if trt_cache_dir is None:  # beside the graphs: the engine directory
                trt_cache_dir = Path(next(iter(graph_paths.values()))).parent / TRT_CACHE_DIR
            providers = [(PROVIDERS["tensorrt"], tensorrt_provider_options(Path(trt_cache_dir)))]
        self.cuda_graph = cuda_graph and self.provider == "cuda"
        if cuda_graph and not self.cuda_graph:
            log.warning("CUDA graphs need ONNX Runtime's CUDA provider; %s runs without them", self.provider)
        graph_providers = [(PROVIDERS["cuda"], {"enable_cuda_graph": "1"})] if self.cuda_graph else None
        if self.provider != "cpu":
            providers.append(PROVIDERS["cpu"])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Several sessions take turns (full, cluster, select, partial): a thread pool that spins
        # after its run would hold the cores the next session needs, so idle threads sleep.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = {}
        self._graphed: set[str] = set()  # graphs whose session has the CUDA provider's graphs on
        for name, path in graph_paths.items():
            try:
                self.sessions[name] = self._session(name, path, so, providers, graph_providers)
            except Exception as e:
                raise EngineError(
                    f"engine file {Path(path).name} cannot be loaded by ONNX Runtime "
                    f"({describe(e, 300)}); rebuild with clusca-trt build"
                ) from e
            ran = self.sessions[name].get_providers()[0]
            if ran != PROVIDERS[self.provider]:
                log.warning("graph %s runs on %s, not %s", name, ran, PROVIDERS[self.provider])
        self._state: dict[str, object] = {}
        self._spare: dict[str, object] = {}
        self._out = {}
        for n, g in spec.graphs.items():
            for t in g.outputs:
                if t.name == OUT:
                    self._out[n] = self._alloc(t.shape, t.dtype)
        for n, t in self.state_specs.items():
            self._state[n] = self._alloc(t.shape, t.dtype)
            if n in self.pingpong:
                self._spare[n] = self._alloc(t.shape, t.dtype)
        self._graph_ids = AnnotationIds()
        self._static_feeds = {
            (n, t.name): self._alloc(t.shape, t.dtype) for n in self._graphed for t in self.host_inputs(n)
        }
        log.info("ONNX Runtime engine on %s (%s)", self.provider, PROVIDERS[self.provider])

    def _session(self, name, path, so, providers, graph_providers):
        if graph_providers is not None:
            try:
                session = self._ort.InferenceSession(str(path), so, providers=graph_providers)
                self._graphed.add(name)
                return session
            except Exception as e:  # e.g. a node the CUDA provider does not take: no graph for this one
                log.warning("graph %s runs without CUDA graphs: %s", name, one_line(e))
        return self._ort.InferenceSession(str(path), so, providers=providers)

    def _alloc(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, NP_DTYPES[dtype]), self._ort_device, 0)

    def reset(self) -> None:
        for n, t in self.state_specs.items():
            self._state[n].update_inplace(np.zeros(t.shape, NP_DTYPES[t.dtype]))

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        g = self.spec.graphs[graph]
        self.check_feeds(g, feeds)
        session = self.sessions[graph]
        binding = session.io_binding()
        for t in g.inputs:
            if t.name in self._state:
                binding.bind_ortvalue_input(t.name, self._state[t.name])
            elif (graph, t.name) in self._static_feeds:
                self._static_feeds[graph, t.name].update_inplace(np.ascontiguousarray(feeds[t.name]))
                binding.bind_ortvalue_input(t.name, self._static_feeds[graph, t.name])
            else:
                binding.bind_ortvalue_input(
                    t.name, self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[t.name]), self._ort_device, 0)
                )
        written = []
        for t in g.outputs:
            if t.name == OUT:
                binding.bind_ortvalue_output(OUT, self._out[graph])
            elif t.state_name in self._spare:  # read and written by this graph: write the other buffer
                binding.bind_ortvalue_output(t.name, self._spare[t.state_name])
                written.append(t.state_name)
            else:  # no input of this graph is this buffer: in place
                binding.bind_ortvalue_output(t.name, self._state[t.state_name])
        try:
            session.run_with_iobinding(binding, self._run_options(graph, g))
        except Exception as e:  # onnxruntime's Fail / RuntimeException / InvalidArgument: not RuntimeError
            raise EngineError(
                f"graph {graph} failed in ONNX Runtime: expected it to compute the shapes its signature declares, "
                f"got {type(e).__name__}: {_first_line(e)}; rebuild with clusca-trt build"
            ) from e
        for n in written:
            self._state[n], self._spare[n] = self._spare[n], self._state[n]
        if graph not in self._out:
            return None
        self.host_syncs += 1
        return self._out[graph].numpy().copy()

    def _run_options(self, graph, g):
        """None, or the provider's graph id for this graph's exact set of bound buffers."""
        if graph not in self._graphed:
            return None
        addresses = [self._state[t.name].data_ptr() if t.name in self._state else self._static_feeds[graph, t.name].data_ptr()
                     for t in g.inputs]
        addresses += [self._out[graph].data_ptr() if t.name == OUT else
                      (self._spare if t.state_name in self._spare else self._state)[t.state_name].data_ptr()
                      for t in g.outputs]
        key = GraphKey((graph,), tuple(t.shape for t in g.inputs + g.outputs), tuple(addresses))
        options = self._ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(self._graph_ids.id_for(key)))
        return options

    def read_state(self, name: str) -> np.ndarray:
        return self._state[name].numpy().copy()

    def close(self) -> None:
        self.sessions.clear()
        self._state.clear()
        self._spare.clear()
