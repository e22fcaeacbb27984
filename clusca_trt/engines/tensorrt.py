"""TensorRT: exported ONNX graphs -> plans in the engine directory -> a StepEngine on the GPU.

Build (``build_plans``): every graph of an engine directory -> ``<graph>.<key>.plan`` beside it,
with Polygraphy's loaders (``NetworkFromOnnxPath`` -> ``CreateConfig`` -> ``EngineFromNetwork``
-> ``SaveEngine``), static shapes, strongly typed networks, TF32 off, a timing cache reused across
builds, the builder optimisation level and workspace limit as options, on the CUDA device asked
for (current while building, deserializing and creating contexts). Precision lives in the graph:
for fp16 / bf16 the model graphs (full, partial, forecast) are rewritten so that MatMul, Gemm
and Conv run in the low type between casts (PyTorch autocast's policy: element-wise work,
normalisation, softmax and the sinusoidal timestep embedding stay fp32), and the module caches
are graph inputs and outputs in the low type (half the state memory); then built strongly
typed (weakly typed builds with precision flags are deprecated since TensorRT 10.12 and gone
in 11). The rewrite streams the weights tensor by tensor between external-data files, so host
memory stays bounded for FLUX-size graphs (``_lowered_file``). The k-means and selection graphs
stay fp32 (argmin over distances is precision sensitive, and they are tiny), and so do the
hidden states, centroids and distances.

The plans are keyed by content (``plan_key``): the ONNX files, the build options, the hash of
the precision-rewriting code (fp16 / bf16), the TensorRT version and the GPU (compute capability
and name). The manifest's ``tensorrt`` section records them; plans built for another TensorRT
version or GPU, or lowered by other rewriting code, are refused with a one-line message, never
deserialized.

Weights: every plan embeds its own copy of the weights it uses (full + partial + forecast: about
2.2 x the model's weights on the device, and as much again on disk). TensorRT's weight-stripped
plans (``STRIP_PLAN`` with ``REFIT_IDENTICAL``, refitted at load from the ONNX weights) shrink the
plan files but not the device memory: a refit copies the weights into each engine. See the
README's GPU section for the numbers and the route to one device copy.

Run (``TensorRTEngine``): one execution context per plan, bound to device buffers with
``set_tensor_address`` and launched with ``execute_async_v3`` on one CUDA stream. The state
(module caches, hidden states, centroids, assignments, fresh indices) lives on the GPU for the
whole sampling run in the plans' types; a tensor that one graph both reads and writes (the caches,
the centroids: ``base.pingpong_state``) has two buffers that swap after the call, every other one
buffer. Graphs without a host output (cluster, select) are queued and launched with the next graph
that has one, so the partial step's sequence (select -> partial) is one unit; that unit is captured
once as a CUDA graph per address set (``cuda_graph.GraphCache``) and replayed. Host feeds are
written into pinned host buffers and copied asynchronously on the engine's stream; ``out`` is the
only tensor that comes back, once per step, and its download is the step's one host
synchronisation (``Device.host_syncs`` counts them).

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
from ..spec import OUT, STATE_SUFFIX, WEIGHTED_GRAPHS, ExportSpec
from .base import EngineInfo, StepEngine, returns_out
from .cuda_graph import Action, CaptureConfig, GraphCache, GraphKey
from .manifest import Manifest, describe_files, now

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
MODEL_GRAPHS = WEIGHTED_GRAPHS  # built in the requested precision
LOW_PRECISION_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
PLAN_FORMAT = 2  # 2: fp16 / bf16 plans keep the module caches in the low type
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
    """What a plan is only valid for: the exact TensorRT version, the GPU's compute capability and
    its name (two GPUs of one compute capability differ in multiprocessors, memory and clocks,
    which TensorRT's tactic choice depends on)."""

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


def rewrite_key(options: "TrtBuildOptions") -> str | None:
    """The hash of the precision-rewriting code where it shapes the plans (fp16 / bf16), else None."""
    return rewrite_code_sha256() if options.precision != "fp32" else None


def plan_key(onnx_sha256: dict[str, str], options: TrtBuildOptions, platform: TrtPlatform) -> str:
    """Content key of a set of plans: ONNX file hashes, build options, the code that rewrote their
    precision, TensorRT version, GPU (compute capability and name)."""
    return value_sha256(
        {
            "format": PLAN_FORMAT,
            "onnx": dict(sorted(onnx_sha256.items())),
            "options": options.key_dict(),
            "rewrite": rewrite_key(options),
            "tensorrt": platform.tensorrt,
            "compute_capability": platform.compute_capability,
            "device": platform.device,
        }
    )


def check_platform(recorded: dict, current: TrtPlatform, directory: Path | str = "") -> None:
    """Refuse plans built for another TensorRT version or GPU, or lowered to fp16 / bf16 by other
    precision-rewriting code (one line, says how to fix it)."""
    rec = recorded.get("platform", {})
    got = (rec.get("tensorrt"), rec.get("compute_capability"), rec.get("device") or "")
    want = (current.tensorrt, current.compute_capability, current.device)
    where = f" in {directory}" if str(directory) else ""
    if got != want:
        built_on = f" ({got[2]})" if got[2] else ""
        raise EngineMismatchError(
            f"TensorRT plans{where} were built with TensorRT {got[0]} for compute capability {got[1]}{built_on}, "
            f"this machine has TensorRT {want[0]} and compute capability {want[1]} ({want[2]}); "
            f"rebuild them with clusca-trt build --backend tensorrt"
        )
    options = recorded.get("options") or {}
    if options.get("precision", "fp32") != "fp32" and recorded.get("rewrite") != rewrite_code_sha256():
        raise EngineMismatchError(
            f"TensorRT plans{where} were lowered to {options['precision']} by another version of clusca-trt's "
            f"precision rewrite; rebuild them with clusca-trt build --backend tensorrt"
        )


def default_timing_cache(platform: TrtPlatform, env: dict | None = None) -> Path:
    """``$XDG_CACHE_HOME/clusca-trt/timing-trt<version>-sm<cc>.cache`` (``~/.cache`` by default)."""
    env = os.environ if env is None else env
    base = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "~")).expanduser() / ".cache")
    cc = platform.compute_capability.replace(".", "")
    return base / "clusca-trt" / f"timing-trt{platform.tensorrt}-sm{cc}.cache"


# -- precision: move it into the graph ------------------------------------------------------


def lower_precision(model, precision: str, types: dict[str, int] | None = None, state=(), store=None):
    """ONNX model -> the same model with MatMul / Gemm / Conv / ConvTranspose in fp16 or bf16.

    Float inputs of those nodes are cast to the low type (initializers are converted instead),
    their outputs cast back to fp32, so every other node keeps its type. A node whose operator
    does not take the low type at the model's opset stays fp32 (ONNX Conv takes bf16 from
    opset 22). ``state``: names of graph inputs and outputs (the module caches) that take the low
    type at the graph's interface, cast to fp32 right after the input and from fp32 right before
    the output (TensorRT fuses the casts), so the engine keeps them in half the memory; every other
    input and output keeps its type. ``types`` maps value names to ONNX element types (default: ONNX
    shape inference on ``model``; pass it for models over 2 GB). ``store`` reads and writes
    initializers (``_MemoryStore`` by default; ``_ExternalStore`` streams them tensor by tensor
    between external-data files). Returns a new model.
    """
    import onnx
    import onnx.defs
    from onnx import TensorProto, helper

    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    store = store or _MemoryStore()
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    low_str = "tensor(float16)" if precision == "fp16" else "tensor(bfloat16)"
    lowered_ops = {
        op for op in LOW_PRECISION_OPS
        if any(low_str in tc.allowed_type_strs for tc in onnx.defs.get_schema(op, opset).type_constraints)
    }
    if types is None:
        types = value_types(onnx.shape_inference.infer_shapes(model))
    types = dict(types)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    head, tail = _low_interface(g, set(state), low, types)
    inits = {i.name: i for i in g.initializer}
    converted: dict[str, str] = {}
    nodes = list(head)
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
                    g.initializer.append(store.convert(inits[name], converted[name], lambda a: _to_low(a, precision)))
                else:
                    nodes.append(helper.make_node("Cast", [name], [converted[name]], name=f"{name}__to_{precision}", to=low))
            node.input[i] = converted[name]
        back = []
        for j, name in enumerate(node.output):
            if name and types.get(name) == TensorProto.FLOAT:
                node.output[j] = f"{name}__{precision}"
                converted[name] = node.output[j]  # a lowered consumer reads the low value: no cast pair
                back.append(helper.make_node("Cast", [node.output[j]], [name], name=f"{name}__to_fp32", to=TensorProto.FLOAT))
        nodes.append(node)
        nodes += back
    nodes += tail
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


def _low_interface(g, state: set[str], low: int, types: dict[str, int]) -> tuple[list, list]:
    """Give the float graph inputs and outputs named in ``state`` the low type ``low``: consumers
    of such an input read its fp32 cast ``<name>__fp32``; such an output is the low cast of what
    its producer made (renamed ``<name>__fp32``). Returns the Cast nodes to put first and last."""
    from onnx import TensorProto, helper

    # one pass over the nodes: where every name is read and written (not a scan per state tensor)
    readers: dict[str, list] = {}
    writers: dict[str, list] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, []).append((n.input, i))
        for j, name in enumerate(n.output):
            writers.setdefault(name, []).append((n.output, j))
    outputs = {o.name for o in g.output}
    head, tail = [], []
    touched = set()
    for v in g.input:
        if v.name in state and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            wide = f"{v.name}__fp32"
            for names, i in readers.get(v.name, ()):
                names[i] = wide
            if v.name in outputs:  # a state tensor passed through unchanged
                raise ConfigError(f"graph output {v.name} is also a graph input; cannot give it a low type")
            head.append(helper.make_node("Cast", [v.name], [wide], name=f"{v.name}__to_fp32_in", to=TensorProto.FLOAT))
            v.type.tensor_type.elem_type = low
            types[v.name], types[wide] = low, TensorProto.FLOAT
            touched.add(v.name)
    for v in g.output:
        if v.name in state and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            wide = f"{v.name}__fp32"
            if not writers.get(v.name):
                raise ConfigError(f"graph output {v.name} has no producing node; cannot give it a low type")
            for names, j in writers[v.name]:
                names[j] = wide
            for names, i in readers.get(v.name, ()):  # nodes that also read the output inside the graph read its fp32 value
                names[i] = wide
            tail.append(helper.make_node("Cast", [wide], [v.name], name=f"{v.name}__to_low_out", to=low))
            v.type.tensor_type.elem_type = low
            types[v.name], types[wide] = low, TensorProto.FLOAT
            touched.add(v.name)
    keep = [vi for vi in g.value_info if vi.name not in touched]
    del g.value_info[:]
    g.value_info.extend(keep)
    return head, tail


def half_state(spec: ExportSpec) -> frozenset[str]:
    """The graph inputs and outputs of the model graphs that are kept in the plan's low type: the
    module caches (``<slot>_f0``, ``<slot>_fhi`` and their ``_out``). Hidden states, centroids,
    distances and indices stay as they are (k-means runs in fp32)."""
    names = {t.name for t in spec.cache_tensors()}
    return frozenset(names | {n + STATE_SUFFIX for n in names})


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


class _MemoryStore:
    """Initializers in memory: read, convert, and put back as embedded tensors."""

    def convert(self, tensor, name: str, fn):
        from onnx import numpy_helper

        return numpy_helper.from_array(fn(numpy_helper.to_array(tensor)), name)


class _ExternalStore:
    """Initializers streamed tensor by tensor: read from the source model's external data
    (``source_dir``), written to one new external-data file ``sink`` (named ``location`` beside
    the new model). At most one tensor (and its converted twin) is in memory at a time."""

    ALIGN = 4096

    def __init__(self, source_dir: Path, sink, location: str):
        self.source_dir, self.sink, self.location = str(source_dir), sink, location
        self.written: set[str] = set()  # names of the tensors already in ``sink``

    def read(self, tensor) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(tensor, self.source_dir)

    def put(self, array: np.ndarray, name: str):
        from onnx import TensorProto, external_data_helper, numpy_helper

        tensor = numpy_helper.from_array(array, name)
        raw = tensor.raw_data
        pad = -self.sink.tell() % self.ALIGN
        self.sink.write(b"\0" * pad)
        offset = self.sink.tell()
        self.sink.write(raw)
        external_data_helper.set_external_data(tensor, self.location, offset, len(raw))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        self.written.add(name)
        return tensor

    def convert(self, tensor, name: str, fn):
        return self.put(fn(self.read(tensor)), name)

    def relocate(self, model) -> None:
        """Move every initializer that still points into the source's external data into ``sink``."""
        from onnx import external_data_helper

        for tensor in model.graph.initializer:
            if external_data_helper.uses_external_data(tensor) and tensor.name not in self.written:
                tensor.CopyFrom(self.put(self.read(tensor), tensor.name))


def _lowered_file(src: Path, precision: str, workdir: Path, state=()) -> Path:
    """Write the low-precision twin of ``src`` into ``workdir`` (weights as external data).

    Host memory stays bounded for graphs of any size: the graph is loaded without its weights,
    and the weights are streamed tensor by tensor from ``src``'s external data into the twin's
    (read, convert, write, drop). Peak: the graph structure plus about 2.5 x the largest
    tensor in fp32 (FLUX.1-dev's largest, a single block's ``proj_out``, is 189 MB: well under
    1 GB at the peak), never the whole model."""
    import onnx

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    types = value_types(onnx.shape_inference.infer_shapes(model))
    dst = workdir / src.name
    location = dst.name + ".data"
    with open(workdir / location, "wb") as sink:
        store = _ExternalStore(src.parent, sink, location)
        low = lower_precision(model, precision, types, state=state, store=store)
        store.relocate(low)
    onnx.save_model(low, str(dst))
    return dst


def rewrite_code_sha256() -> str:
    """Hash of the code that rewrites a graph's precision (part of the plan key: plans lowered by
    other code are rebuilt, and refused at load)."""
    import hashlib
    import inspect

    h = hashlib.sha256(repr(sorted(LOW_PRECISION_OPS)).encode())
    for obj in (lower_precision, _low_interface, half_state, value_types, _to_low, _MemoryStore, _ExternalStore,
                _lowered_file):
        try:
            h.update(inspect.getsource(obj).encode())
        except (OSError, TypeError):  # no source shipped: the compiled code stands for it
            code = getattr(obj, "__code__", None)
            h.update(repr((code.co_code, code.co_consts) if code else obj.__qualname__).encode())
    return h.hexdigest()


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


def on_device(index: int):
    """Make CUDA device ``index`` current (``cudaSetDevice``, through torch) for what TensorRT does
    next: it builds, deserializes and creates execution contexts on the current device."""
    return _require_cuda_torch(index).cuda.device(index)


def build_plan(onnx_path: Path, plan_path: Path, options: TrtBuildOptions, timing_cache: Path):
    """One ONNX graph -> one serialized plan at ``plan_path``; returns the deserialized engine.
    Call it with the target device current (``on_device``)."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    with _polygraphy_output(f"TensorRT build of {Path(onnx_path).name}"):
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        pools = {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20} if options.workspace_mib else None
        config = CreateConfig(
            tf32=False,  # Polygraphy clears TensorRT's TF32 flag: fp32 means fp32; low precision is explicit in the graph
            builder_optimization_level=options.optimization_level,
            memory_pool_limits=pools,
            load_timing_cache=str(timing_cache),
        )
        build = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache))
        return SaveEngine(build, path=str(plan_path))()


def build_plans(manifest: Manifest, options: TrtBuildOptions, device: int = 0, force: bool = False) -> Manifest:
    """Build (or reuse) a TensorRT plan for every graph of an engine directory, on CUDA device ``device``.

    Content-keyed: the same ONNX files (and weights), options, precision-rewriting code, TensorRT
    version and GPU reuse the plans (after checking their files). Every plan is built in a temporary
    folder first; only then do they move in under new names, the manifest is replaced atomically and
    the old plans are removed, so a failed build leaves the directory as it was. A lowered (fp16 /
    bf16) graph is written next to its plan, streamed tensor by tensor (``_lowered_file``), and
    deleted once its plan is built.
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
            log.info("building TensorRT plan for %s (%d/%d, %s, optimisation level %d, cuda:%d)", name, i,
                     len(spec.graphs), precision, options.optimization_level, device)
            lowered = None if precision == "fp32" else _lowered_file(src, precision, work, state=half_state(spec))
            staged[name] = work / f"{name}.plan"
            with on_device(device):
                engine = build_plan(lowered or src, staged[name], options, timing_cache)
                check_plan_io(spec, name, engine_io(engine))
                del engine
            if lowered is not None:
                for f in (lowered, lowered.with_name(lowered.name + ".data")):
                    f.unlink(missing_ok=True)
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
            "rewrite": rewrite_key(options),
            "plans": plans,
        }
        updated = Manifest(data, directory)
        updated.write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for f in old - _plan_files(updated):
        f.unlink(missing_ok=True)
    log.info("TensorRT plans written to %s (key %s, TensorRT %s, sm %s, %s)", directory, key[:12], platform.tensorrt,
             platform.compute_capability, platform.device)
    return updated


def _plan_files(manifest: Manifest) -> set[Path]:
    plans = manifest.data.get("tensorrt", {}).get("plans", {})
    return {manifest.plan_path(f["file"]) for e in plans.values() for f in e["files"]}


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
    """Buffers, copies and graphs on one stream (CUDA through torch here; a numpy twin in the tests).

    Host synchronisations (the host waiting for the device) are counted in ``host_syncs``:
    ``download`` is one (it returns host data), ``synchronize`` is one, and an ``upload`` is one
    only if its staging buffer is still being read by an earlier copy (never in the engine's
    steady state: every step ends with the download of ``out``, after which all copies are done)."""

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


class Runner(Protocol):
    """One plan and its execution context."""

    name: str
    tensors: dict[str, TensorIO]

    def set_address(self, tensor: str, address: int) -> None: ...
    def launch(self, stream_handle: int) -> None: ...


@dataclass
class StagedBuffer:
    """A device buffer with a pinned host twin: a host feed is written into ``host`` and copied to
    ``device`` asynchronously on the engine's stream; ``copied`` is the event of the last copy."""

    device: Any
    host: Any
    copied: Any = None


class TorchCudaDevice:
    """Device buffers are torch CUDA tensors on device ``index``; one stream; graphs are
    ``torch.cuda.CUDAGraph``. Host feeds go through pinned host buffers and asynchronous copies on
    the stream; ``out`` comes back through a pinned buffer, with the one synchronisation of a step."""

    def __init__(self, index: int = 0):
        torch = _require_cuda_torch(index)
        self.torch = torch
        self.index = index
        self.device = torch.device("cuda", index)
        with torch.cuda.device(index):
            self.stream = torch.cuda.Stream(self.device)
        self.stream_handle = self.stream.cuda_stream
        self.host_syncs = 0
        self._pinned_out: dict[tuple, Any] = {}
        self._dtypes = {
            "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
        }

    def activate(self):
        return self.torch.cuda.device(self.index)

    def alloc(self, shape, dtype, staged: bool = False):
        with self.activate(), self.torch.cuda.stream(self.stream):
            buf = self.torch.zeros(tuple(shape), dtype=self._dtypes[dtype], device=self.device)
            if not staged:
                return buf
            host_dtype = self._dtypes["float32"] if dtype in ("float16", "bfloat16") else buf.dtype
            return StagedBuffer(buf, self.torch.empty(tuple(shape), dtype=host_dtype, pin_memory=True))

    def address(self, buf) -> int:
        return int((buf.device if isinstance(buf, StagedBuffer) else buf).data_ptr())

    def zero(self, buf) -> None:
        with self.activate(), self.torch.cuda.stream(self.stream):
            (buf.device if isinstance(buf, StagedBuffer) else buf).zero_()

    def upload(self, buf: StagedBuffer, array) -> None:
        if buf.copied is not None and not buf.copied.query():  # the last copy still reads ``host``
            self.host_syncs += 1
            buf.copied.synchronize()
        buf.host.numpy()[...] = array  # a host memcpy into pinned memory
        with self.activate(), self.torch.cuda.stream(self.stream):
            buf.device.copy_(buf.host, non_blocking=True)
            if buf.copied is None:
                buf.copied = self.torch.cuda.Event()
            buf.copied.record(self.stream)

    def download(self, buf) -> np.ndarray:
        torch = self.torch
        with self.activate(), torch.cuda.stream(self.stream):
            src = buf.float() if buf.dtype in (torch.float16, torch.bfloat16) else buf
            key = (tuple(src.shape), src.dtype)
            if key not in self._pinned_out:
                self._pinned_out[key] = torch.empty(key[0], dtype=src.dtype, pin_memory=True)
            host = self._pinned_out[key]
            host.copy_(src, non_blocking=True)
        self.synchronize()
        return host.numpy().copy()

    def synchronize(self) -> None:
        self.host_syncs += 1
        self.stream.synchronize()

    def capture(self, launch):
        graph = self.torch.cuda.CUDAGraph()
        self.host_syncs += 1  # torch.cuda.graph synchronizes the device before it captures (once per graph)
        with self.activate(), self.torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            launch(self.stream_handle)
        return graph

    def replay(self, graph) -> None:
        with self.activate(), self.torch.cuda.stream(self.stream):
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
    """Step graphs as TensorRT plans; the state stays on the device. Use as a context manager.

    Host synchronisations per step: one, the download of ``out`` (``Device.host_syncs`` counts
    them). Host feeds are written into pinned staging buffers and copied asynchronously on the
    engine's stream; graphs without ``out`` are queued and launched with the next one that has it.
    """

    backend = "tensorrt"

    def __init__(
        self,
        spec: ExportSpec,
        runners: dict[str, Runner],
        device: Device,
        cuda_graphs: CaptureConfig | bool = True,
        info: EngineInfo | None = None,
    ):
        super().__init__(spec, info or EngineInfo(self.backend, "cuda:0", "fp32"))
        self.runners = runners
        self.device = device
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
        log.info("TensorRT engine on %s (CUDA graphs %s, state %.1f MiB)", self.info,
                 "on" if cuda_graphs.enabled else "off", self.state_bytes() / 2**20)

    def _buffer_dtypes(self) -> dict[str, str]:
        """dtype of every state tensor and output buffer, from the plans (must agree across plans)."""
        seen: dict[str, str] = {}
        for name, runner in self.runners.items():
            for tio in runner.tensors.values():
                state = tio.name.removesuffix(STATE_SUFFIX)
                key = state if state in self.state_specs else f"{name}:{tio.name}"
                if key in seen and seen[key] != tio.dtype:
                    raise EngineError(f"plans disagree on the type of {key}: {seen[key]} and {tio.dtype}; rebuild")
                seen[key] = tio.dtype
        return seen

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
        sizes = {"float16": 2, "bfloat16": 2, "int32": 4, "float32": 4, "int64": 8, "bool": 1}
        total = 0
        for n, t in self.state_specs.items():
            total += int(np.prod(t.shape)) * sizes.get(self._dtype(n, t.dtype), 4) * (2 if n in self.pingpong else 1)
        return total

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
        runner = self.runners[graph]
        bind: dict[str, int] = {}
        for t in g.inputs:
            if t.name in self._state:
                buf = self._state[t.name]
            else:
                buf = self._feeds[graph, t.name]
                self.device.upload(buf, feeds[t.name])  # asynchronous, on the engine's stream
            if t.name in runner.tensors:
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
        with self.device.activate():
            self._flush()
            return np.asarray(self.device.download(self._state[name]))

    def close(self) -> None:
        self._queue.clear()
        with contextlib.suppress(Exception), self.device.activate():
            self.device.synchronize()
        self.graphs.invalidate()
        self._state, self._spare, self._out, self._feeds = {}, {}, {}, {}
        self.runners = {}


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

    runners = {}
    with on_device(device):
        for name, entry in section["plans"].items():
            path = manifest.plan_path(entry["file"])
            with _polygraphy_output(f"loading TensorRT plan {path.name}"):
                engine = EngineFromBytes(path.read_bytes())()
            runners[name] = TrtRunner(name, engine)
    precision = section["options"]["precision"]
    cuda = TorchCudaDevice(device)
    info = EngineInfo("tensorrt", f"cuda:{device}", precision, None, cuda.torch.cuda.get_device_name(device))
    return TensorRTEngine(manifest.spec, runners, cuda, cuda_graphs, info=info)
