"""TensorRT: exported ONNX graphs -> plans in the engine directory -> a StepEngine on the GPU.

Build (``build_plans``): every graph of an engine directory -> ``<graph>.<key>.plan`` beside it,
with Polygraphy's loaders (``NetworkFromOnnxPath`` -> ``CreateConfig`` -> ``EngineFromNetwork``
-> ``SaveEngine``), static shapes, strongly typed networks, a timing cache reused across builds,
the builder optimisation level and workspace limit as options. Precision lives in the graph:
for fp16 / bf16 the model graphs (full, partial, forecast) are rewritten so that MatMul, Gemm
and Conv run in the low type between casts (PyTorch autocast's policy: element-wise work,
normalisation, softmax and the sinusoidal timestep embedding stay fp32), then built strongly
typed; weakly typed builds with precision flags are deprecated since TensorRT 10.12 and gone
in 11. The k-means and selection graphs stay fp32 (argmin over distances is precision
sensitive, and they are tiny). Graph inputs and outputs, and so the module caches, stay fp32.

The plans are keyed by content (``plan_key``): the ONNX files, the build options, the TensorRT
version and the GPU's compute capability. The manifest's ``tensorrt`` section records them;
plans built for another TensorRT version or GPU are refused with a one-line message, never
deserialized.

Run (``TensorRTEngine``): one execution context per plan, bound to device buffers with
``set_tensor_address`` and launched with ``execute_async_v3`` on one CUDA stream. The state
(module caches, hidden states, centroids, assignments, fresh indices) lives on the GPU for the
whole sampling run, two buffers per tensor (ping-pong: a graph that reads ``mlp_f0`` and writes
``mlp_f0_out`` reads one and writes the other). Graphs without a host output (cluster, select)
are queued and launched with the next graph that has one, so the partial step's sequence
(select -> partial) is one unit; that unit is captured once as a CUDA graph per address set
(``cuda_graph.GraphCache``) and replayed. Host feeds are copied into static device buffers
before the launch; ``out`` is the only tensor that comes back, once per step.

TensorRT, Polygraphy's TensorRT backend and CUDA (through a CUDA build of torch) are imported
lazily: ``import clusca_trt`` and every CPU path work without them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BackendUnavailableError, ConfigError, EngineError, EngineMismatchError
from ..hashing import value_sha256
from ..spec import GRAPH_FORECAST, GRAPH_FULL, GRAPH_PARTIAL, OUT, ExportSpec
from .base import StepEngine, returns_out
from .cuda_graph import Action, CaptureConfig, GraphCache, GraphKey
from .manifest import Manifest, describe_files, now

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
MODEL_GRAPHS = (GRAPH_FULL, GRAPH_PARTIAL, GRAPH_FORECAST)  # built in the requested precision
LOW_PRECISION_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
PLAN_FORMAT = 1
INSTALL_HINT = (
    "install it with: pip install 'clusca-trt[tensorrt]' (NVIDIA's tensorrt wheels; they need an NVIDIA GPU, "
    "its driver and a CUDA build of torch)"
)


# -- availability ---------------------------------------------------------------------------


def require_tensorrt():
    """The ``tensorrt`` module, or a one-line ``BackendUnavailableError`` saying how to install it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a placeholder package that raises on import
        raise BackendUnavailableError(f"TensorRT is not installed ({type(e).__name__}: {e}".splitlines()[0][:160]
                                      + f"); {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise BackendUnavailableError(f"the installed tensorrt package is not TensorRT (no Builder); {INSTALL_HINT}")
    return trt


def _require_cuda_torch(device: int):
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise BackendUnavailableError(f"TensorRT needs a CUDA GPU through torch, got {build} (torch {torch.__version__})")
    if not 0 <= device < torch.cuda.device_count():
        raise BackendUnavailableError(f"expected a CUDA device index below {torch.cuda.device_count()}, got {device}")
    return torch


# -- options, platform, keys ----------------------------------------------------------------


@dataclass(frozen=True)
class TrtBuildOptions:
    """precision:          fp32, fp16 or bf16 (the model graphs; k-means and selection stay fp32).
    optimization_level: TensorRT builder optimisation level 0..5 (TensorRT's default is 3).
    workspace_mib:      workspace memory-pool limit in MiB (None: TensorRT's default, the GPU's memory).
    timing_cache:       timing cache file, reused and extended across builds (None: a per-user file
                        named by TensorRT version and compute capability)."""

    precision: str = "fp16"
    optimization_level: int = 3
    workspace_mib: int | None = None
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.optimization_level, int) or not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"builder optimisation level must be an integer in 0..5, got {self.optimization_level!r}")
        if self.workspace_mib is not None and (not isinstance(self.workspace_mib, int) or self.workspace_mib < 1):
            raise ConfigError(f"workspace limit must be a positive number of MiB, got {self.workspace_mib!r}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", str(self.timing_cache))

    def key_dict(self) -> dict:
        """What changes a plan (the timing cache only changes how fast it is found)."""
        d = asdict(self)
        d.pop("timing_cache")
        return d

    def graph_precision(self, graph: str) -> str:
        return self.precision if graph in MODEL_GRAPHS else "fp32"


@dataclass(frozen=True)
class TrtPlatform:
    """What a plan is only valid for: the exact TensorRT version and the GPU's compute capability."""

    tensorrt: str
    compute_capability: str
    device: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def current_platform(device: int = 0) -> TrtPlatform:
    trt = require_tensorrt()
    torch = _require_cuda_torch(device)
    major, minor = torch.cuda.get_device_capability(device)
    return TrtPlatform(str(trt.__version__), f"{major}.{minor}", torch.cuda.get_device_name(device))


def plan_key(onnx_sha256: dict[str, str], options: TrtBuildOptions, platform: TrtPlatform) -> str:
    """Content key of a set of plans: ONNX file hashes, build options, TensorRT version, GPU."""
    return value_sha256(
        {
            "format": PLAN_FORMAT,
            "onnx": dict(sorted(onnx_sha256.items())),
            "options": options.key_dict(),
            "tensorrt": platform.tensorrt,
            "compute_capability": platform.compute_capability,
        }
    )


def check_platform(recorded: dict, current: TrtPlatform, directory: Path | str = "") -> None:
    """Refuse plans built for another TensorRT version or GPU (one line, says how to fix it)."""
    rec = recorded.get("platform", {})
    got = (rec.get("tensorrt"), rec.get("compute_capability"))
    want = (current.tensorrt, current.compute_capability)
    if got != want:
        where = f" in {directory}" if str(directory) else ""
        built_on = f" ({rec['device']})" if rec.get("device") else ""
        raise EngineMismatchError(
            f"TensorRT plans{where} were built with TensorRT {got[0]} for compute capability {got[1]}{built_on}, "
            f"this machine has TensorRT {want[0]} and compute capability {want[1]} ({current.device}); "
            f"rebuild them with clusca-trt build --backend tensorrt"
        )
    if rec.get("device") and current.device and rec["device"] != current.device:
        log.info("plans were built on %s and run on %s (same compute capability)", rec["device"], current.device)


def default_timing_cache(platform: TrtPlatform, env: dict | None = None) -> Path:
    """``$XDG_CACHE_HOME/clusca-trt/timing-trt<version>-sm<cc>.cache`` (``~/.cache`` by default)."""
    env = os.environ if env is None else env
    base = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "~")).expanduser() / ".cache")
    cc = platform.compute_capability.replace(".", "")
    return base / "clusca-trt" / f"timing-trt{platform.tensorrt}-sm{cc}.cache"


# -- precision: move it into the graph ------------------------------------------------------


def lower_precision(model, precision: str, types: dict[str, int] | None = None):
    """ONNX model -> the same model with MatMul / Gemm / Conv / ConvTranspose in fp16 or bf16.

    Float inputs of those nodes are cast to the low type (initializers are converted instead),
    their outputs cast back to fp32, so every other node, the graph inputs and outputs keep
    their types. A node whose operator does not take the low type at the model's opset stays
    fp32 (ONNX Conv takes bf16 from opset 22). ``types`` maps value names to ONNX element types
    (default: ONNX shape inference on ``model``; pass it for models over 2 GB). Returns a new model.
    """
    import onnx
    import onnx.defs
    from onnx import TensorProto, helper, numpy_helper

    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    low_str = "tensor(float16)" if precision == "fp16" else "tensor(bfloat16)"
    lowered_ops = {
        op for op in LOW_PRECISION_OPS
        if any(low_str in tc.allowed_type_strs for tc in onnx.defs.get_schema(op, opset).type_constraints)
    }
    if types is None:
        types = value_types(onnx.shape_inference.infer_shapes(model))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    converted: dict[str, str] = {}
    nodes = []
    for node in g.node:
        if node.op_type not in lowered_ops or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT:
                continue
            if name not in converted:
                converted[name] = f"{name}__{precision}"
                if name in inits:
                    g.initializer.append(numpy_helper.from_array(_to_low(numpy_helper.to_array(inits[name]), precision),
                                                                 converted[name]))
                else:
                    nodes.append(helper.make_node("Cast", [name], [converted[name]], name=f"{name}__to_{precision}", to=low))
            node.input[i] = converted[name]
        back = []
        for j, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT:
                node.output[j] = f"{name}__{precision}"
                back.append(helper.make_node("Cast", [node.output[j]], [name], name=f"{name}__to_fp32", to=TensorProto.FLOAT))
        nodes.append(node)
        nodes += back
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


def value_types(model) -> dict[str, int]:
    """Element type of every named value (inputs, outputs, initializers, inferred value_info)."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _to_low(a: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        return a.astype(np.float16)
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16)


def _lowered_file(src: Path, precision: str, workdir: Path) -> Path:
    """Write the low-precision twin of ``src`` into ``workdir`` (weights as external data)."""
    import onnx

    types = value_types(onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False)))
    model = lower_precision(onnx.load(str(src)), precision, types)
    dst = workdir / src.name
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return dst


# -- build ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _polygraphy_output(what: str):
    """Polygraphy prints; keep its output in our log and put its last error line into ours."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except Exception as e:
        lines = [ln.strip() for ln in buf.getvalue().splitlines() if "ERROR" in ln or "Error" in ln]
        detail = lines[-1] if lines else f"{type(e).__name__}: {e}"
        raise EngineError(f"{what} failed: {detail}".splitlines()[0][:400]) from e
    finally:
        if buf.getvalue().strip():
            log.debug("polygraphy / TensorRT output (%s):\n%s", what, buf.getvalue())


def build_plan(onnx_path: Path, plan_path: Path, options: TrtBuildOptions, timing_cache: Path):
    """One ONNX graph -> one serialized plan at ``plan_path``; returns the deserialized engine."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    with _polygraphy_output(f"TensorRT build of {Path(onnx_path).name}"):
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        pools = {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20} if options.workspace_mib else None
        config = CreateConfig(
            tf32=False,  # fp32 means fp32; the low-precision parts are explicit in the graph
            builder_optimization_level=options.optimization_level,
            memory_pool_limits=pools,
            load_timing_cache=str(timing_cache),
        )
        build = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache))
        return SaveEngine(build, path=str(plan_path))()


def build_plans(manifest: Manifest, options: TrtBuildOptions, device: int = 0, force: bool = False) -> Manifest:
    """Build (or reuse) a TensorRT plan for every graph of an engine directory.

    Content-keyed: the same ONNX files (and weights), options, TensorRT version and GPU reuse the
    plans (after checking their files). Every plan is built in a temporary folder first; only
    then do they move in under new names, the manifest is replaced atomically and the old plans
    are removed, so a failed build leaves the directory as it was.
    """
    from .trt_compat import check_graphs

    require_tensorrt()
    platform = current_platform(device)
    directory = manifest.directory
    onnx_hashes = {n: ",".join(f["sha256"] for f in e["files"]) for n, e in manifest.data["graphs"].items()}
    key = plan_key(onnx_hashes, options, platform)
    section = manifest.data.get("tensorrt")
    if section and section.get("key") == key and not force:
        try:
            manifest.verify(hashes=True)
            log.info("TensorRT plans in %s are up to date (key %s): reusing them", directory, key[:12])
            return manifest
        except EngineError as e:
            log.info("TensorRT plans in %s cannot be reused (%s): rebuilding", directory, e)
    check_graphs(manifest.graph_paths(), strict=True)
    timing_cache = Path(options.timing_cache) if options.timing_cache else default_timing_cache(platform)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    spec = manifest.spec
    work = Path(tempfile.mkdtemp(prefix=".plans-building-", dir=directory))
    try:
        staged = {}
        for i, (name, src) in enumerate(manifest.graph_paths().items(), 1):
            precision = options.graph_precision(name)
            log.info("building TensorRT plan for %s (%d/%d, %s, optimisation level %d)", name, i,
                     len(spec.graphs), precision, options.optimization_level)
            onnx_file = src if precision == "fp32" else _lowered_file(src, precision, work)
            staged[name] = work / f"{name}.plan"
            engine = build_plan(onnx_file, staged[name], options, timing_cache)
            check_plan_io(spec, name, engine_io(engine))
            del engine
        plans = {}
        for name, tmp_plan in staged.items():
            final = directory / f"{name}.{key[:12]}.plan"
            os.replace(tmp_plan, final)
            plans[name] = dict(describe_files(directory, {name: final})[name], precision=options.graph_precision(name))
        old = _plan_files(manifest)
        data = dict(manifest.data)
        data["tensorrt"] = {
            "key": key,
            "created": now(),
            "platform": platform.to_dict(),
            "options": options.key_dict(),
            "plans": plans,
        }
        updated = Manifest(data, directory)
        updated.write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for f in old - _plan_files(updated):
        f.unlink(missing_ok=True)
    log.info("TensorRT plans written to %s (key %s, TensorRT %s, sm %s)", directory, key[:12], platform.tensorrt,
             platform.compute_capability)
    return updated


def _plan_files(manifest: Manifest) -> set[Path]:
    plans = manifest.data.get("tensorrt", {}).get("plans", {})
    return {manifest.directory / f["file"] for e in plans.values() for f in e["files"]}


# -- engine I/O -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorIO:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str  # numpy-style name: float32, float16, bfloat16, int64, int32, bool


def engine_io(engine) -> dict[str, TensorIO]:
    """The I/O tensors of a deserialized ``trt.ICudaEngine``."""
    trt = require_tensorrt()
    names = {
        "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32", "BOOL": "bool",
    }
    out = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        dt = engine.get_tensor_dtype(n)
        out[n] = TensorIO(
            n,
            engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
            tuple(int(d) for d in engine.get_tensor_shape(n)),
            names.get(getattr(dt, "name", str(dt)), str(dt)),
        )
    return out


def check_plan_io(spec: ExportSpec, graph: str, io: dict[str, TensorIO]) -> None:
    """A plan's I/O must be the spec's: every output, the inputs it uses, same shapes and types.
    (TensorRT drops network inputs a graph does not use; those are simply not bound.)"""
    g = spec.graphs[graph]
    want = {t.name: (True, t) for t in g.inputs} | {t.name: (False, t) for t in g.outputs}
    for name, tio in io.items():
        if name not in want:
            raise EngineError(f"plan {graph}: expected I/O tensors {sorted(want)}, got an extra {name!r}; rebuild")
        is_input, t = want[name]
        if tio.is_input != is_input or tio.shape != t.shape:
            raise EngineError(
                f"plan {graph} tensor {name}: expected {'input' if is_input else 'output'} {list(t.shape)}, "
                f"got {'input' if tio.is_input else 'output'} {list(tio.shape)}; rebuild"
            )
        if (t.dtype == "int64") != (tio.dtype in ("int64", "int32")):
            raise EngineError(f"plan {graph} tensor {name}: expected {t.dtype}, got {tio.dtype}; rebuild")
    missing = [t.name for t in g.outputs if t.name not in io]
    if missing:
        raise EngineError(f"plan {graph}: expected output {missing[0]!r}, got none; rebuild")


# -- the device: what the engine needs from CUDA -----------------------------------------------


class Device(Protocol):
    """Buffers, copies and graphs on one stream (CUDA through torch here; a numpy twin in the tests)."""

    stream_handle: int

    def alloc(self, shape: tuple[int, ...], dtype: str) -> Any: ...
    def address(self, buf) -> int: ...
    def zero(self, buf) -> None: ...
    def upload(self, buf, array: np.ndarray) -> None: ...
    def download(self, buf) -> np.ndarray: ...
    def synchronize(self) -> None: ...
    def capture(self, launch: Callable[[int], None]) -> Any: ...
    def replay(self, graph) -> None: ...


class Runner(Protocol):
    """One plan and its execution context."""

    name: str
    tensors: dict[str, TensorIO]

    def set_address(self, tensor: str, address: int) -> None: ...
    def launch(self, stream_handle: int) -> None: ...


class TorchCudaDevice:
    """Device buffers are torch CUDA tensors; one side stream; graphs are ``torch.cuda.CUDAGraph``."""

    def __init__(self, index: int = 0):
        torch = _require_cuda_torch(index)
        self.torch = torch
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(self.device)
        self.stream_handle = self.stream.cuda_stream
        self._dtypes = {
            "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
        }

    def alloc(self, shape, dtype):
        with self.torch.cuda.stream(self.stream):
            return self.torch.zeros(tuple(shape), dtype=self._dtypes[dtype], device=self.device)

    def address(self, buf) -> int:
        return int(buf.data_ptr())

    def zero(self, buf) -> None:
        with self.torch.cuda.stream(self.stream):
            buf.zero_()

    def upload(self, buf, array) -> None:
        # a synchronous copy from pageable memory: the launches it precedes are queued, not yet
        # issued (see TensorRTEngine.run), so this waits for nothing but the copy
        with self.torch.cuda.stream(self.stream):
            buf.copy_(self.torch.from_numpy(np.ascontiguousarray(array)))

    def download(self, buf) -> np.ndarray:
        with self.torch.cuda.stream(self.stream):
            host = buf.float().to("cpu") if buf.dtype in (self.torch.float16, self.torch.bfloat16) else buf.to("cpu")
        return host.numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch):
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            launch(self.stream_handle)
        return graph

    def replay(self, graph) -> None:
        with self.torch.cuda.stream(self.stream):
            graph.replay()


class TrtRunner:
    """A deserialized plan with its own execution context (static shapes: no profiles to set)."""

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


# -- the engine ----------------------------------------------------------------------------


class TensorRTEngine(StepEngine):
    """Step graphs as TensorRT plans; the state stays on the device. Use as a context manager."""

    backend = "tensorrt"

    def __init__(
        self,
        spec: ExportSpec,
        runners: dict[str, Runner],
        device: Device,
        cuda_graphs: CaptureConfig | bool = True,
        provider: str = "cuda",
    ):
        super().__init__(spec)
        self.runners = runners
        self.device = device
        self.provider = provider
        if isinstance(cuda_graphs, bool):
            cuda_graphs = CaptureConfig(enabled=cuda_graphs)
        self.graphs = GraphCache(cuda_graphs)
        missing = [g for g in spec.graphs if g not in runners]
        if missing:
            raise EngineError(f"expected a plan for every graph, got none for {missing[0]}; rebuild")
        for name, runner in runners.items():
            check_plan_io(spec, name, runner.tensors)
        self._dtypes = self._buffer_dtypes()
        self._queue: list[tuple[str, dict[str, int]]] = []
        self._alloc_all()
        log.info("TensorRT engine on %s (CUDA graphs %s)", provider, "on" if cuda_graphs.enabled else "off")

    def _buffer_dtypes(self) -> dict[str, str]:
        """dtype of every state tensor and output buffer, from the plans (must agree across plans)."""
        seen: dict[str, str] = {}
        for name, runner in self.runners.items():
            for tio in runner.tensors.values():
                state = tio.name.removesuffix("_out")
                key = state if state in self.state_specs else f"{name}:{tio.name}"
                if key in seen and seen[key] != tio.dtype:
                    raise EngineError(f"plans disagree on the type of {key}: {seen[key]} and {tio.dtype}; rebuild")
                seen[key] = tio.dtype
        return seen

    def _dtype(self, key: str, spec_dtype: str) -> str:
        return self._dtypes.get(key, spec_dtype)

    def _alloc_all(self) -> None:
        """Every device buffer, anew: state and spare per state tensor, ``out`` per graph, one
        static buffer per host input. Graphs captured with the old buffers are dropped."""
        d = self.device
        self._state = {n: d.alloc(t.shape, self._dtype(n, t.dtype)) for n, t in self.state_specs.items()}
        self._spare = {n: d.alloc(t.shape, self._dtype(n, t.dtype)) for n, t in self.state_specs.items()}
        self._out = {}
        self._feeds = {}
        for name, g in self.spec.graphs.items():
            for t in g.outputs:
                if t.name == OUT:
                    self._out[name] = d.alloc(t.shape, self._dtype(f"{name}:{OUT}", t.dtype))
            for t in self.host_inputs(name):
                self._feeds[name, t.name] = d.alloc(t.shape, self._dtype(f"{name}:{t.name}", t.dtype))
        d.synchronize()
        dropped = self.graphs.invalidate()
        if dropped:
            log.info("device buffers reallocated: %d captured CUDA graphs dropped", dropped)

    def reallocate(self) -> None:
        """Free and allocate every device buffer anew (the state is lost, as after ``reset``).
        Captured CUDA graphs refer to the old buffers: they are dropped and re-captured."""
        self._flush()
        self.device.synchronize()
        self._alloc_all()

    def reset(self) -> None:
        self._flush()
        for buf in self._state.values():
            self.device.zero(buf)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        g = self.spec.graphs[graph]
        self.check_feeds(g, feeds)
        if any(name == graph for name, _ in self._queue):
            self._flush()  # its static feed buffers are about to be overwritten
        runner = self.runners[graph]
        bind: dict[str, int] = {}
        for t in g.inputs:
            if t.name in self._state:
                buf = self._state[t.name]
            else:
                buf = self._feeds[graph, t.name]
                self.device.upload(buf, feeds[t.name])
            if t.name in runner.tensors:
                bind[t.name] = self.device.address(buf)
        written = []
        for t in g.outputs:
            buf = self._out[graph] if t.name == OUT else self._spare[t.state_name]
            bind[t.name] = self.device.address(buf)
            if t.name != OUT:
                written.append(t.state_name)
        for n in written:  # ping-pong: what was written is the state for every graph queued after this one
            self._state[n], self._spare[n] = self._spare[n], self._state[n]
        self._queue.append((graph, bind))
        if not returns_out(g):
            return None  # launched with the next graph that returns ``out`` (or on read_state/reset)
        self._flush()
        return np.asarray(self.device.download(self._out[graph]), dtype=np.float32)

    def _flush(self) -> None:
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        key = GraphKey(
            tuple(name for name, _ in queue),
            tuple(tuple(self.runners[name].tensors[t].shape) for name, bind in queue for t in sorted(bind)),
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
                            "+".join(key.sequence), f"{type(e).__name__}: {e}".splitlines()[0])
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
            runner = self.runners[name]
            for tensor, address in bind.items():
                runner.set_address(tensor, address)

    def _launch(self, queue, stream_handle: int) -> None:
        for name, _ in queue:
            self.runners[name].launch(stream_handle)

    def read_state(self, name: str) -> np.ndarray:
        self._flush()
        return np.asarray(self.device.download(self._state[name]))

    def close(self) -> None:
        self._queue.clear()
        with contextlib.suppress(Exception):
            self.device.synchronize()
        self.graphs.invalidate()
        self._state, self._spare, self._out, self._feeds = {}, {}, {}, {}
        self.runners = {}


def load_engine(
    manifest: Manifest, device: int = 0, cuda_graphs: CaptureConfig | bool = True, verify: bool = True
) -> TensorRTEngine:
    """The TensorRT engine of an engine directory built with ``--backend tensorrt``. Refuses plans
    built for another TensorRT version or GPU before reading them."""
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

    runners = {}
    for name, entry in section["plans"].items():
        path = manifest.directory / entry["file"]
        with _polygraphy_output(f"loading TensorRT plan {path.name}"):
            engine = EngineFromBytes(path.read_bytes())()
        runners[name] = TrtRunner(name, engine)
    precision = section["options"]["precision"]
    return TensorRTEngine(manifest.spec, runners, TorchCudaDevice(device), cuda_graphs,
                          provider=f"cuda:{device} {precision}")
