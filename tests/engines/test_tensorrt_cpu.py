"""The TensorRT path, everything that can be checked without TensorRT or a GPU:

* the one-line error (with how to install) where TensorRT is missing, and that nothing else needs it;
* build options, plan cache keys, refusal of plans built for another TensorRT version or GPU;
* the low-precision rewrite of the model graphs (type-checked by ONNX, numerics by ONNX Runtime
  and the ONNX reference evaluator);
* the TensorRT engine's orchestration (device-resident state, ping-pong, queued select+partial,
  CUDA-graph capture/replay/re-capture) over a numpy twin of the device whose "plans" are the
  same ONNX graphs run by ONNX Runtime: a captured graph replays the addresses it was captured
  with, and reading a freed buffer fails, as on a GPU.
"""

import contextlib
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main
from clusca_trt.config import ClusCaConfig
from clusca_trt.engines.base import EngineInfo, pingpong_state
from clusca_trt.engines.cuda_graph import Action, CaptureConfig
from clusca_trt.engines.manifest import Manifest, describe_files
from clusca_trt.engines.tensorrt import TensorRTEngine
from clusca_trt.engines.trt_plan import (
    TensorIO,
    TrtBuildOptions,
    TrtPlatform,
    check_plan_io,
    check_platform,
    plan_key,
    require_tensorrt,
    rewrite_code_sha256,
)
from clusca_trt.errors import BackendUnavailableError, ConfigError, EngineError, EngineMismatchError
from clusca_trt.exporters.precision import _lowered_file, half_state, lower_precision
from clusca_trt.exporters.trt_build import build_plans, default_timing_cache
from clusca_trt.runtime.pipeline import Pipeline
from clusca_trt.spec import OUT


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, whatever is installed


# -- without TensorRT ------------------------------------------------------------------------------


def test_missing_tensorrt_is_a_one_line_error_saying_how_to_install(no_tensorrt):
    with pytest.raises(BackendUnavailableError) as e:
        require_tensorrt()
    msg = str(e.value)
    assert "TensorRT is not installed" in msg and "pip install 'clusca-trt[tensorrt]'" in msg and "\n" not in msg


def test_placeholder_tensorrt_package_is_refused(monkeypatch):
    placeholder = type(sys)("tensorrt")  # what a name-squatting / placeholder wheel looks like: no Builder
    monkeypatch.setitem(sys.modules, "tensorrt", placeholder)
    with pytest.raises(BackendUnavailableError, match="is not TensorRT .*pip install 'clusca-trt\\[tensorrt\\]'"):
        require_tensorrt()


def test_cli_build_tensorrt_without_tensorrt_fails_before_any_work(no_tensorrt, tmp_path):
    r = CliRunner().invoke(main, ["build", "--backend", "tensorrt", "--precision", "bf16", "--out", str(tmp_path / "e")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "clusca-trt[tensorrt]" in lines[0]
    assert not (tmp_path / "e").exists()


def test_cli_refuses_tensorrt_options_for_onnxruntime(tmp_path):
    r = CliRunner().invoke(main, ["build", "--precision", "bf16", "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "apply to --backend tensorrt" in r.output
    assert not (tmp_path / "e").exists()


def test_import_and_help_do_not_load_tensorrt_or_cuda():
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import clusca_trt, clusca_trt.engines.tensorrt, clusca_trt.engines.trt_plan, clusca_trt.engines.trt_compat\n"
        "import clusca_trt.engines.cuda, clusca_trt.engines.cuda_graph, clusca_trt.exporters.trt_build\n"
        "from click.testing import CliRunner\n"
        "from clusca_trt.cli import main\n"
        "r = CliRunner().invoke(main, ['build', '--help'])\n"
        "assert r.exit_code == 0 and '--backend [onnxruntime|tensorrt]' in r.output, r.output\n"
        "assert 'polygraphy.backend.trt' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_build_plans_without_tensorrt_leaves_the_directory_alone(no_tensorrt, engines_k4):
    before = sorted(p.name for p in engines_k4.directory.iterdir())
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_plans(engines_k4, TrtBuildOptions())
    assert sorted(p.name for p in engines_k4.directory.iterdir()) == before


# -- options, keys, platforms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "int8"}, "precision must be one of fp32, fp16, bf16, got 'int8'"),
        ({"optimization_level": 6}, "optimisation level must be an integer in 0..5, got 6"),
        ({"optimization_level": 2.5}, "optimisation level must be an integer in 0..5, got 2.5"),
        ({"workspace_mib": 0}, "workspace limit must be a positive number of MiB, got 0"),
    ],
)
def test_build_options_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrtBuildOptions(**kwargs)


def test_only_model_graphs_take_the_low_precision():
    o = TrtBuildOptions(precision="bf16")
    assert [o.graph_precision(g) for g in ("full", "partial", "forecast", "cluster_img", "select_img")] == [
        "bf16", "bf16", "bf16", "fp32", "fp32"
    ]


H100 = TrtPlatform("10.15.1.29", "9.0", "NVIDIA H100 80GB HBM3")
ONNX = {"full": "a" * 64, "partial": "b" * 64}


@pytest.mark.parametrize(
    "change",
    [
        lambda o, p, x: (o, p, dict(x, full="c" * 64)),  # a graph changed
        lambda o, p, x: (TrtBuildOptions(precision="bf16"), p, x),
        lambda o, p, x: (TrtBuildOptions(optimization_level=5), p, x),
        lambda o, p, x: (TrtBuildOptions(workspace_mib=1024), p, x),
        lambda o, p, x: (o, TrtPlatform("10.15.1.30", "9.0", p.device), x),  # another TensorRT build
        lambda o, p, x: (o, TrtPlatform(p.tensorrt, "8.9", p.device), x),  # another GPU generation
    ],
)
def test_plan_key_changes_with_what_changes_a_plan(change):
    base = (TrtBuildOptions(), H100, ONNX)
    o, p, x = change(*base)
    assert plan_key(x, o, p) != plan_key(ONNX, *base[:2])


def test_plan_key_ignores_the_timing_cache_but_not_the_gpu_name():
    a = plan_key(ONNX, TrtBuildOptions(timing_cache="/tmp/a.cache"), H100)
    b = plan_key(dict(reversed(ONNX.items())), TrtBuildOptions(timing_cache="/x/b.cache"), H100)
    assert a == b and len(a) == 64
    assert plan_key(ONNX, TrtBuildOptions(), TrtPlatform(H100.tensorrt, "9.0", "NVIDIA H200")) != a


def test_plan_key_of_low_precision_plans_follows_the_rewriting_code(monkeypatch):
    import clusca_trt.engines.trt_plan as trt_mod

    keys = {p: plan_key(ONNX, TrtBuildOptions(precision=p), H100) for p in ("fp32", "bf16")}
    monkeypatch.setattr(trt_mod, "rewrite_code_sha256", lambda: "0" * 64)  # another version of lower_precision
    assert plan_key(ONNX, TrtBuildOptions(precision="bf16"), H100) != keys["bf16"]
    assert plan_key(ONNX, TrtBuildOptions(precision="fp32"), H100) == keys["fp32"]  # fp32 plans are not rewritten


def _section(platform=H100, precision="fp16", rewrite=None):
    return {"platform": platform.to_dict(), "options": TrtBuildOptions(precision=precision).key_dict(),
            "rewrite": rewrite_code_sha256() if rewrite is None else rewrite}


def test_plans_for_the_same_platform_load():
    check_platform(_section(), H100, "engines/dit")
    check_platform(_section(precision="fp32", rewrite="old"), H100, "engines/dit")  # fp32: no rewrite to match


def test_plans_lowered_by_other_rewriting_code_are_refused():
    with pytest.raises(EngineMismatchError, match="lowered to fp16 by another version of clusca-trt's precision "
                                                  "rewrite; rebuild them with clusca-trt build --backend tensorrt"):
        check_platform(_section(rewrite="0" * 64), H100, "engines/dit")


@pytest.mark.parametrize(
    "current, expected",
    [
        (TrtPlatform("10.16.0.1", "9.0", "NVIDIA H100 80GB HBM3"), "this machine has TensorRT 10.16.0.1 and compute capability 9.0"),
        (TrtPlatform("10.15.1.29", "8.9", "NVIDIA L4"), "this machine has TensorRT 10.15.1.29 and compute capability 8.9 (NVIDIA L4)"),
        (TrtPlatform("10.15.1.29", "9.0", "NVIDIA H200"), "this machine has TensorRT 10.15.1.29 and compute capability 9.0 (NVIDIA H200)"),
    ],
)
def test_plans_for_another_tensorrt_or_gpu_are_refused_in_one_line(current, expected):
    with pytest.raises(EngineMismatchError) as e:
        check_platform(_section(), current, "engines/dit")
    msg = str(e.value)
    assert msg.startswith("TensorRT plans in engines/dit were built with TensorRT 10.15.1.29 for compute capability 9.0 "
                          "(NVIDIA H100 80GB HBM3)")
    assert expected in msg and msg.endswith("rebuild them with clusca-trt build --backend tensorrt") and "\n" not in msg


def test_default_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path):
    assert default_timing_cache(H100, {"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "clusca-trt" / "timing-trt10.15.1.29-sm90.cache"
    )
    assert default_timing_cache(H100, {"HOME": "/home/u"}).parent == Path("/home/u/.cache/clusca-trt")


def test_manifest_verify_covers_the_plans(engines_k4, tmp_path):
    d = tmp_path / "eng"
    shutil.copytree(engines_k4.directory, d)
    plan = d / "full.0123456789ab.plan"
    plan.write_bytes(b"serialized plan bytes")
    data = json.loads((d / "manifest.json").read_text())
    data["tensorrt"] = {"key": "k", "platform": H100.to_dict(), "options": TrtBuildOptions().key_dict(),
                        "plans": {"full": describe_files(d, {"full": plan})["full"]}}
    Manifest(data, d).write()
    Manifest.read(d).verify(hashes=True)
    plan.write_bytes(b"serialized plan byteZ")
    with pytest.raises(EngineError, match="full.0123456789ab.plan is corrupt"):
        Manifest.read(d).verify(hashes=True)


def test_onnx_runtime_tensorrt_provider_caches_its_engines_in_the_engine_dir(engines_k4, monkeypatch):
    import clusca_trt.engines.ort as ort_mod

    seen = []
    monkeypatch.setattr(ort_mod, "choose_provider", lambda requested="auto": "tensorrt")

    def session(self, name, path, so, providers, graph_providers):
        seen.append(providers)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort_mod.OrtEngine, "_session", session)
    monkeypatch.setattr(ort_mod.OrtEngine, "_alloc", lambda self, shape, dtype: None)  # no CUDA memory here
    from clusca_trt.engines.open import open_engine

    open_engine(engines_k4, "onnxruntime", provider="tensorrt")
    cache = engines_k4.directory / ort_mod.TRT_CACHE_DIR
    name, options = seen[0][0]
    assert name == "TensorrtExecutionProvider" and cache.is_dir()
    assert options == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    assert all(p == seen[0] for p in seen)  # every graph's session
    cache.rmdir()


# -- the low-precision rewrite -----------------------------------------------------------------------


def _feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[i.name] = rng.integers(0, 4, shape).astype(np.int64)  # labels, cluster ids, token ids: all valid
        else:
            feeds[i.name] = rng.random(shape, dtype=np.float32)
    return feeds


@pytest.mark.parametrize("graph", ["full", "partial", "forecast"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lowered_graphs_are_well_typed_and_keep_their_interface(engines_k4, graph, precision):
    model = onnx.load(str(engines_k4.graph_path(graph)))
    low = lower_precision(model, precision)
    onnx.checker.check_model(low, full_check=True)  # strict type inference over every node
    elem = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    for a, b in ((model.graph.input, low.graph.input), (model.graph.output, low.graph.output)):
        assert [(v.name, v.type.tensor_type.elem_type) for v in a] == [(v.name, v.type.tensor_type.elem_type) for v in b]
    inits = {i.name: i.data_type for i in low.graph.initializer}
    lowered = [n for n in low.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert lowered and all(n.input[0].endswith(f"__{precision}") for n in lowered)
    assert all(inits.get(n.input[1]) in (None, elem) for n in lowered)  # weights converted, not cast at run time
    by_name = {n.name: n for n in low.graph.node}
    for op in ("Sin", "Cos", "LayerNormalization", "Softmax"):  # stay fp32
        for n in (n for n in model.graph.node if n.op_type == op):
            assert list(by_name[n.name].input) == list(n.input)
    conv = next(n for n in low.graph.node if n.op_type == "Conv")
    assert conv.input[0].endswith("__fp16") == (precision == "fp16")  # ONNX Conv takes bf16 only from opset 22
    assert lower_precision(model, "fp32") is model


@pytest.mark.parametrize("graph", ["full", "partial", "forecast"])
def test_fp16_graphs_compute_what_the_fp32_graphs_compute(engines_k4, graph):
    model = onnx.load(str(engines_k4.graph_path(graph)))
    feeds = _feeds(model)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    low = ort.InferenceSession(lower_precision(model, "fp16").SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(low.run(None, feeds), ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-3 * np.abs(b).max())


@pytest.mark.parametrize("graph", ["full", "forecast"])
def test_bf16_graphs_compute_what_the_fp32_graphs_compute(engines_k4, graph):
    """ONNX Runtime's CPU provider has no bf16 MatMul: the ONNX reference evaluator runs it
    (it cannot run the partial graph's GatherElements at this size)."""
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(engines_k4.graph_path(graph)))
    feeds = _feeds(model)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(ReferenceEvaluator(lower_precision(model, "bf16")).run(None, feeds), ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-2 * np.abs(b).max())


@pytest.mark.parametrize("graph", ["full", "partial", "forecast"])
def test_lowered_graphs_keep_the_caches_in_the_low_type(engines_k4, graph, tmp_path):
    spec = engines_k4.spec
    path = _lowered_file(engines_k4.graph_path(graph), "bf16", tmp_path, state=half_state(spec))
    onnx.checker.check_model(str(path), full_check=True)
    low = onnx.load(str(path))
    caches = half_state(spec)
    g = spec.graphs[graph]
    for values, specs in ((low.graph.input, g.inputs), (low.graph.output, g.outputs)):
        assert [v.name for v in values] == [t.name for t in specs]  # the interface keeps its names
        for v, t in zip(values, specs):
            want = onnx.TensorProto.BFLOAT16 if v.name in caches else (
                onnx.TensorProto.INT64 if t.dtype == "int64" else onnx.TensorProto.FLOAT)
            assert v.type.tensor_type.elem_type == want, v.name
    assert caches & {t.name for t in g.inputs + g.outputs}  # every model graph reads or writes caches


def test_fp16_state_graphs_compute_what_the_fp32_graphs_compute(engines_k4, tmp_path):
    spec = engines_k4.spec
    src = engines_k4.graph_path("full")
    model = onnx.load(str(src))
    feeds = _feeds(model)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    low = ort.InferenceSession(str(_lowered_file(src, "fp16", tmp_path, state=half_state(spec))),
                               providers=["CPUExecutionProvider"])
    caches = half_state(spec)
    low_feeds = {k: v.astype(np.float16) if k in caches else v for k, v in feeds.items()}
    names = [o.name for o in model.graph.output]
    for name, a, b in zip(names, low.run(names, low_feeds), ref.run(names, feeds)):
        assert a.dtype == (np.float16 if name in caches else b.dtype), name
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=0, atol=5e-3 * np.abs(b).max() + 1e-3)


def test_lowering_a_large_graph_streams_its_weights(tmp_path):
    """Host memory while lowering stays near the largest tensor, not the model: 32 weights of 4 MiB
    (128 MiB of external data) are lowered to fp16 with a peak RSS increase well under the model's
    size (loading it whole, as before, took more than the model). Measured in a fresh process
    (``ru_maxrss`` is a high-water mark)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n, d = 32, 1024
    weights = [numpy_helper.from_array(rng.standard_normal((d, d), dtype=np.float32) / np.float32(np.sqrt(d)), f"w{i}")
               for i in range(n)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(n)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d])],
                              [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, [4, d])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what the installed ONNX Runtime reads
    src = tmp_path / "src" / "full.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="full.onnx.data", size_threshold=1024)
    del model, graph, weights
    assert (src.parent / "full.onnx.data").stat().st_size >= 2 ** 27  # 128 MiB of weights
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "import numpy, onnx, ml_dtypes\n"
        "from clusca_trt.exporters.precision import _lowered_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "_lowered_file(Path(sys.argv[1]), 'fp16', Path(sys.argv[2]))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    grown_mib = int(r.stdout.strip().splitlines()[-1]) / 1024
    assert grown_mib < 40, f"lowering 128 MiB of weights grew the peak RSS by {grown_mib:.0f} MiB"
    assert (out / "full.onnx.data").stat().st_size >= 2 ** 26  # the fp16 weights, streamed out
    onnx.checker.check_model(str(out / "full.onnx"), full_check=True)
    x = rng.standard_normal((4, d), dtype=np.float32)
    a = ort.InferenceSession(str(out / "full.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(b).max())


# -- the engine over a numpy twin of the device ------------------------------------------------------


class _Buffer:
    __slots__ = ("__weakref__", "array", "ptr", "staged")


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


class NumpyDevice:
    """Buffers are numpy arrays at fake addresses that are never reused; a freed buffer is gone
    from the address table. A capture records (runner, addresses bound at capture time);
    a replay runs exactly those, as a CUDA graph does. Counts host synchronisations as the CUDA
    device does (a download, a synchronize, a capture), checks that every call happens with the
    device made current, and that host feeds go through staged buffers."""

    stream_handle = 7

    def __init__(self):
        self.table = weakref.WeakValueDictionary()
        self._next = 1 << 12
        self.capturing = None
        self.launched = []  # graph names, in launch order (eager launches and replays)
        self.host_syncs = 0
        self.active = 0  # depth of activate()

    @contextlib.contextmanager
    def activate(self):
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def alloc(self, shape, dtype, staged=False):
        assert self.active
        b = _Buffer()
        b.array, b.ptr, b.staged = np.zeros(shape, _np_dtype(dtype)), self._next, staged
        self._next += 1 << 12
        self.table[b.ptr] = b
        return b

    def address(self, buf):
        return buf.ptr

    def zero(self, buf):
        assert self.active
        buf.array[...] = 0

    def upload(self, buf, array):
        assert self.capturing is None and self.active and buf.staged
        buf.array[...] = array

    def download(self, buf):
        assert self.active
        self.host_syncs += 1
        return buf.array.astype(np.float32) if buf.array.dtype.kind == "f" or buf.array.dtype == _np_dtype("bfloat16") \
            else buf.array.copy()

    def synchronize(self):
        self.host_syncs += 1

    def capture(self, launch):
        assert self.active
        self.host_syncs += 1
        self.capturing = []
        try:
            launch(self.stream_handle)
            return tuple(self.capturing)
        finally:
            self.capturing = None

    def replay(self, graph):
        assert self.active
        for runner, addresses in graph:
            runner.execute(addresses)


class OrtPlan:
    """A "plan": the graph's ONNX file run by ONNX Runtime CPU, reading and writing device buffers
    by the addresses bound to it. Its I/O types are the file's (a lowered graph has fp16 caches)."""

    def __init__(self, name, path, spec, device):
        g = spec.graphs[name]
        self.name, self.device = name, device
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [t.name for t in g.inputs]
        self.outputs = [t.name for t in g.outputs]
        proto = onnx.load(str(path), load_external_data=False).graph
        types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                 for v in list(proto.input) + list(proto.output)}
        self.tensors = {t.name: TensorIO(t.name, True, t.shape, types[t.name]) for t in g.inputs}
        self.tensors.update({t.name: TensorIO(t.name, False, t.shape, types[t.name]) for t in g.outputs})
        self.addresses = {}

    def set_address(self, tensor, address):
        assert tensor in self.tensors
        self.addresses[tensor] = address

    def launch(self, stream_handle):
        assert stream_handle == NumpyDevice.stream_handle and self.device.active
        if self.device.capturing is not None:
            self.device.capturing.append((self, dict(self.addresses)))
        else:
            self.execute(self.addresses)

    def execute(self, addresses):
        self.device.launched.append(self.name)
        ins, outs = {addresses[n] for n in self.inputs}, {addresses[n] for n in self.outputs}
        assert not ins & outs, f"{self.name} reads and writes one buffer (TensorRT forbids aliased I/O)"
        table = self.device.table
        feeds = {n: table[addresses[n]].array for n in self.inputs}  # KeyError: a freed buffer
        for n, value in zip(self.outputs, self.session.run(self.outputs, feeds)):
            np.copyto(table[addresses[n]].array, value)


def twin_engine(manifest, cuda_graphs=True, paths=None):
    device = NumpyDevice()
    spec = manifest.spec
    plans = {n: OrtPlan(n, p, spec, device) for n, p in (paths or manifest.graph_paths()).items()}
    return TensorRTEngine(spec, plans, device, cuda_graphs=cuda_graphs,
                          info=EngineInfo("tensorrt", "cuda:0", "fp32", None, "numpy twin"))


def _pipeline(engine, manifest):
    return Pipeline(engine, manifest.model, ClusCaConfig(**manifest.defaults), manifest)


RUN = {"seed": 3, "steps": 20, "interval": 3}


@pytest.fixture(scope="module")
def ort_reference(engines_k4):
    out = {}
    for method in ("clusca", "taylorseer"):
        with Pipeline.load(engines_k4.directory, provider="cpu") as pipe:
            out[method] = pipe.generate([1, 7], method=method, **RUN).latents
    return out


@pytest.mark.parametrize("method", ["clusca", "taylorseer"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_twin_engine_equals_onnx_runtime(engines_k4, ort_reference, method, cuda_graphs):
    engine = twin_engine(engines_k4, cuda_graphs)
    result = _pipeline(engine, engines_k4).generate([1, 7], method=method, **RUN)
    np.testing.assert_allclose(result.latents, ort_reference[method], rtol=0, atol=1e-6)
    stats = engine.graphs.stats
    if cuda_graphs:
        assert stats[Action.CAPTURE] >= 2 and stats[Action.REPLAY] >= 2  # both ping-pong address sets
        assert len(engine.graphs) == stats[Action.CAPTURE]
    else:
        assert stats[Action.CAPTURE] == stats[Action.REPLAY] == 0


def test_select_is_queued_and_launched_with_partial(engines_k4):
    engine = twin_engine(engines_k4, cuda_graphs=False)
    spec = engines_k4.spec
    pipe = _pipeline(engine, engines_k4)
    pipe.generate([1, 7], method="clusca", seed=0, steps=4, interval=3)
    launched = engine.device.launched
    assert "select_img" in launched
    for i, name in enumerate(launched):
        if name == "select_img":
            assert launched[i + 1] == "partial"
        if name == "cluster_img":
            assert launched[i - 1] == "full" and launched[i + 1] in ("select_img", "full")
    # read_state flushes the queue: a select run on its own is visible at once
    engine.reset()
    feeds = {"key_img": np.random.default_rng(0).random(spec.graphs["select_img"].input("key_img").shape, dtype=np.float32),
             "dist_weight": np.zeros(1, np.float32)}
    n = len(launched)
    assert engine.run("select_img", feeds) is None and len(launched) == n
    assert engine.read_state("fresh_img").shape == spec.state_tensors()["fresh_img"].shape and launched[n:] == ["select_img"]


def test_reallocation_drops_graphs_and_never_replays_them(engines_k4, ort_reference):
    engine = twin_engine(engines_k4, cuda_graphs=CaptureConfig(warmup=0))
    pipe = _pipeline(engine, engines_k4)
    pipe.generate([1, 7], method="clusca", **RUN)
    captured = engine.graphs.stats[Action.CAPTURE]
    old = {name: engine.device.address(buf) for name, buf in engine._state.items()}
    assert captured >= 2 and len(engine.graphs) == captured
    engine.reallocate()
    assert len(engine.graphs) == 0
    assert all(old[n] not in engine.device.table for n in old)  # the old buffers are freed
    # the same run again: the stale graphs would read freed buffers (KeyError); re-captured ones are right
    result = pipe.generate([1, 7], method="clusca", **RUN)
    np.testing.assert_allclose(result.latents, ort_reference["clusca"], rtol=0, atol=1e-6)
    assert engine.graphs.stats[Action.CAPTURE] == 2 * captured


def test_reset_keeps_buffers_and_graphs(engines_k4):
    engine = twin_engine(engines_k4)
    pipe = _pipeline(engine, engines_k4)
    first = pipe.generate([1, 7], method="clusca", **RUN).latents
    replays = engine.graphs.stats[Action.REPLAY]
    second = pipe.generate([1, 7], method="clusca", **RUN).latents  # generate resets the engine
    np.testing.assert_array_equal(first, second)
    assert engine.graphs.stats[Action.CAPTURE] == len(engine.graphs)  # nothing re-captured
    assert engine.graphs.stats[Action.REPLAY] > replays


def test_state_never_comes_to_the_host_between_steps(engines_k4):
    engine = twin_engine(engines_k4)
    downloads = []
    real = engine.device.download
    engine.device.download = lambda buf: downloads.append(buf.array.shape) or real(buf)
    _pipeline(engine, engines_k4).generate([1, 7], method="clusca", **RUN)
    out_shape = engines_k4.spec.graphs["full"].outputs[0].shape
    assert downloads and all(s == out_shape for s in downloads)  # only ``out``, once per engine step


def test_one_host_synchronisation_per_step(engines_k4):
    engine = twin_engine(engines_k4)
    pipe = _pipeline(engine, engines_k4)
    pipe.generate([1, 7], method="clusca", **RUN)  # first run: captures (one sync each)
    captured = engine.graphs.stats[Action.CAPTURE]
    before = engine.device.host_syncs
    pipe.generate([1, 7], method="clusca", **RUN)
    assert engine.graphs.stats[Action.CAPTURE] == captured
    assert engine.device.host_syncs - before == RUN["steps"]  # the download of ``out``, nothing else
    assert engine.host_syncs == engine.device.host_syncs  # what the engine reports is the device's count


def test_only_state_a_graph_reads_and_writes_has_a_spare_buffer(engines_k4):
    engine = twin_engine(engines_k4)
    caches = {f"{s}_{f}_{i}" for s in ("attn", "mlp") for f in ("f0", "fhi") for i in range(4)}  # dit-tiny: 4 blocks
    assert engine.pingpong == pingpong_state(engines_k4.spec) == caches | {"centroids_img"}
    assert set(engine._spare) == engine.pingpong  # hidden, assignments, distances, fresh indices: one buffer
    sizes = {n: int(np.prod(t.shape)) * 4 * (2 if t.dtype == "int64" else 1) for n, t in engine.state_specs.items()}
    assert engine.state_bytes() == sum(sizes.values()) + sum(sizes[n] for n in engine.pingpong)


@pytest.fixture(scope="module")
def fp16_plans(engines_k4, tmp_path_factory):
    """The graphs as build_plans lowers them for fp16 plans: model graphs with fp16 caches."""
    spec, work = engines_k4.spec, tmp_path_factory.mktemp("fp16")
    paths = {}
    for name, path in engines_k4.graph_paths().items():
        precision = TrtBuildOptions(precision="fp16").graph_precision(name)
        paths[name] = path if precision == "fp32" else _lowered_file(path, precision, work, state=half_state(spec))
    return paths


@pytest.mark.parametrize("method", ["taylorseer", "clusca"])
def test_twin_engine_with_fp16_state_equals_onnx_runtime_fp32(engines_k4, ort_reference, fp16_plans, method):
    engine = twin_engine(engines_k4, paths=fp16_plans)
    state = engine._state
    assert {n for n, b in state.items() if b.array.dtype == np.float16} == set(half_state(engines_k4.spec)) & set(state)
    assert state["hidden_img"].array.dtype == state["centroids_img"].array.dtype == np.float32  # k-means in fp32
    result = _pipeline(engine, engines_k4).generate([1, 7], method=method, **RUN)
    ref = ort_reference[method]
    assert np.abs(result.latents - ref).max() / np.abs(ref).max() < 3e-2
    full = twin_engine(engines_k4).state_bytes()
    tables = sum(4 * int(np.prod(t.shape)) for t in engines_k4.spec.cond_tables())  # fp32 in both
    assert engine.state_bytes() - tables < 0.6 * (full - tables)  # the caches are most of the rest


def test_plan_io_must_match_the_spec(engines_k4):
    spec = engines_k4.spec
    g = spec.graphs["partial"]
    io = {t.name: TensorIO(t.name, True, t.shape, t.dtype) for t in g.inputs}
    io.update({t.name: TensorIO(t.name, False, t.shape, t.dtype) for t in g.outputs})
    check_plan_io(spec, "partial", {k: v for k, v in io.items() if k != "gamma"})  # an unused input was dropped
    bad_shape = dict(io, out=TensorIO(OUT, False, (1, 2, 3), "float32"))
    with pytest.raises(EngineError, match=r"plan partial tensor out: expected output \[.*\], got output \[1, 2, 3\]"):
        check_plan_io(spec, "partial", bad_shape)
    with pytest.raises(EngineError, match="expected output 'out', got none"):
        check_plan_io(spec, "partial", {k: v for k, v in io.items() if k != OUT})
    with pytest.raises(EngineError, match="expected int64, got float32"):
        check_plan_io(spec, "partial", dict(io, assign_img=TensorIO("assign_img", True, io["assign_img"].shape, "float32")))


# -- build_plans' bookkeeping, with TensorRT's builder replaced by a recorder ---------------------------


class FakeBuilder:
    """Stands in for TensorRT + Polygraphy: records what it was asked to build, writes a "plan"."""

    def __init__(self, spec, fail_on=None):
        self.spec, self.fail_on, self.calls = spec, fail_on, []
        self.current_device = None  # what on_device made current
        self.devices = []  # the current device at each build

    @contextlib.contextmanager
    def on_device(self, index):
        previous, self.current_device = self.current_device, index
        try:
            yield
        finally:
            self.current_device = previous

    def build_plan(self, onnx_path, plan_path, options, timing_cache):
        name = plan_path.stem
        self.devices.append(self.current_device)
        if name == self.fail_on:
            raise EngineError(f"TensorRT build of {name}.onnx failed: out of memory")
        model = onnx.load(str(onnx_path))
        low = {i.rsplit("__", 1)[-1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
        low &= {"fp16", "bf16"}  # the precisions MatMul / Gemm inputs were lowered to
        self.calls.append((name, low, str(timing_cache)))
        plan_path.write_bytes(f"plan {name} {options.precision} {sorted(low)}".encode())
        return name

    def engine_io(self, name):
        g = self.spec.graphs[name]
        return {t.name: TensorIO(t.name, t in g.inputs, t.shape, t.dtype) for t in g.inputs + g.outputs}


@pytest.fixture
def fake_trt(monkeypatch, engines_k4, tmp_path):
    import clusca_trt.exporters.trt_build as trt_mod

    builder = FakeBuilder(engines_k4.spec)
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: type(sys)("tensorrt"))
    monkeypatch.setattr(trt_mod, "current_platform", lambda device=0: H100)
    monkeypatch.setattr(trt_mod, "build_plan", lambda *a: builder.build_plan(*a))
    monkeypatch.setattr(trt_mod, "engine_io", lambda engine: builder.engine_io(engine))
    monkeypatch.setattr(trt_mod, "on_device", builder.on_device)
    d = tmp_path / "eng"
    shutil.copytree(engines_k4.directory, d)
    return builder, Manifest.read(d)


def _dir_state(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_build_plans_builds_every_graph_in_its_precision_and_records_them(fake_trt, tmp_path):
    builder, manifest = fake_trt
    cache = tmp_path / "timing.cache"
    updated = build_plans(manifest, TrtBuildOptions(precision="bf16", timing_cache=str(cache)))
    section = Manifest.read(manifest.directory).data["tensorrt"]
    assert section == updated.data["tensorrt"]
    assert section["platform"] == H100.to_dict() and section["options"]["precision"] == "bf16"
    assert set(section["plans"]) == set(manifest.spec.graphs)
    calls = {name: low for name, low, _ in builder.calls}
    assert calls["full"] == calls["partial"] == calls["forecast"] == {"bf16"}  # lowered model graphs
    assert calls["cluster_img"] == calls["select_img"] == set()  # k-means and selection stay fp32
    assert {c for _, _, c in builder.calls} == {str(cache)}  # one timing cache for every build
    assert {p["precision"] for n, p in section["plans"].items()} == {"bf16", "fp32"}
    Manifest.read(manifest.directory).verify(hashes=True)
    assert not list(manifest.directory.glob(".plans-building-*"))


def test_build_plans_builds_on_the_device_asked_for(fake_trt):
    builder, manifest = fake_trt
    updated = build_plans(manifest, TrtBuildOptions(precision="bf16"), device=1)
    assert builder.devices == [1] * len(manifest.spec.graphs)
    assert updated.data["tensorrt"]["rewrite"] == rewrite_code_sha256()
    assert updated.data["tensorrt"]["platform"]["device"] == H100.device


def test_build_plans_reuses_same_key_and_replaces_on_change(fake_trt):
    builder, manifest = fake_trt
    first = build_plans(manifest, TrtBuildOptions(precision="fp16"))
    n = len(builder.calls)
    again = build_plans(Manifest.read(manifest.directory), TrtBuildOptions(precision="fp16", timing_cache="/elsewhere"))
    assert len(builder.calls) == n and again.data["tensorrt"]["key"] == first.data["tensorrt"]["key"]
    old_files = sorted(manifest.directory.glob("*.plan"))
    build_plans(Manifest.read(manifest.directory), TrtBuildOptions(precision="fp32"))
    new_files = sorted(manifest.directory.glob("*.plan"))
    assert len(new_files) == len(old_files) and not set(old_files) & set(new_files)  # old plans removed


def test_failed_plan_build_leaves_the_directory_as_it_was(fake_trt):
    builder, manifest = fake_trt
    build_plans(manifest, TrtBuildOptions(precision="fp16"))
    before = _dir_state(manifest.directory)
    builder.fail_on = "partial"
    with pytest.raises(EngineError, match="TensorRT build of partial.onnx failed"):
        build_plans(Manifest.read(manifest.directory), TrtBuildOptions(precision="bf16"))
    assert _dir_state(manifest.directory) == before


def test_build_plans_runs_the_compatibility_check_first(fake_trt, monkeypatch):
    from clusca_trt.engines.trt_compat import TensorRTCompatError

    builder, manifest = fake_trt
    full = manifest.graph_path("full")
    model = onnx.load(str(full))
    node = next(n for n in model.graph.node if n.op_type in ("Tanh", "Gelu", "Sigmoid"))
    node.op_type = "Bernoulli"
    onnx.save(model, str(full))
    with pytest.raises(TensorRTCompatError, match=rf"full.onnx: node '{node.name}' \(Bernoulli\)"):
        build_plans(manifest, TrtBuildOptions(), force=True)
    assert builder.calls == []
