"""engines/trt_plan.py: what a TensorRT plan is valid for and what it must look like, shared by the
build (``exporters.trt_build``) and the loader (``engines.tensorrt``).

* ``TrtBuildOptions``: precision, builder optimisation level, workspace limit, timing cache;
* ``plan_key``: the content key of a set of plans: the ONNX files, the build options, the hash of
  the precision-rewriting code (fp16 / bf16; ``rewrite_code_sha256``), the TensorRT version and the
  GPU (compute capability and name), recorded in the manifest's ``tensorrt`` section;
* ``check_platform``: plans built for another TensorRT version or GPU, or lowered by other
  rewriting code, are refused with a one-line message, never deserialized;
* ``engine_io`` / ``check_plan_io``: a deserialized plan's I/O tensors, held to the spec;
* ``require_tensorrt``: the ``tensorrt`` module, or a one-line error saying how to install it.

TensorRT and Polygraphy are imported lazily: ``import clusca_trt`` and every CPU path work without them.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BackendUnavailableError, ConfigError, EngineError, EngineMismatchError, describe, one_line
from ..hashing import file_sha256, value_sha256
from ..spec import WEIGHTED_GRAPHS, ExportSpec
from .cuda import require_cuda

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
PLAN_FORMAT = 2  # 2: fp16 / bf16 plans keep the module caches in the low type
#: the precision rewrite, read as text for its hash (the engines never import the exporters)
REWRITE_SOURCE = Path(__file__).resolve().parent.parent / "exporters" / "precision.py"
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
        raise BackendUnavailableError(f"TensorRT is not installed ({describe(e, 160)}); {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise BackendUnavailableError(f"the installed tensorrt package is not TensorRT (no Builder); {INSTALL_HINT}")
    return trt


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
        return self.precision if graph in WEIGHTED_GRAPHS else "fp32"


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
    torch = require_cuda(device, "TensorRT")
    major, minor = torch.cuda.get_device_capability(device)
    return TrtPlatform(str(trt.__version__), f"{major}.{minor}", torch.cuda.get_device_name(device))


def on_device(index: int):
    """Make CUDA device ``index`` current (``cudaSetDevice``, through torch) for what TensorRT does
    next: it builds, deserializes and creates execution contexts on the current device."""
    return require_cuda(index, "TensorRT").cuda.device(index)


def rewrite_code_sha256() -> str:
    """Hash of the code that rewrites a graph's precision: the text of ``exporters/precision.py``
    (any edit counts: a rebuild too many, never one too few). Part of the plan key: plans lowered by
    other code are rebuilt, and refused at load. Where the source is not shipped, the package
    version stands for it."""
    try:
        return file_sha256(REWRITE_SOURCE)
    except OSError:
        from .._version import __version__

        return value_sha256({"clusca-trt": __version__})


def rewrite_key(options: TrtBuildOptions) -> str | None:
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


@contextlib.contextmanager
def polygraphy_output(what: str):
    """Polygraphy prints; keep its output in our log and put its last error line into ours."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except Exception as e:
        lines = [ln.strip() for ln in buf.getvalue().splitlines() if "ERROR" in ln or "Error" in ln]
        detail = lines[-1] if lines else f"{type(e).__name__}: {e}"
        raise EngineError(f"{what} failed: {one_line(detail)}") from e
    finally:
        if buf.getvalue().strip():
            log.debug("polygraphy / TensorRT output (%s):\n%s", what, buf.getvalue())


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
