"""Latency benchmark of an engine directory, and the latency regression check against a baseline.

    pipe, settings -> run_bench -> result (a JSON-able dict) -> format_table / compare(result, baseline)

Noise handling: every method first runs ``warmup_runs`` times on a short schedule (first calls
allocate); then ``repeats`` rounds each run every method once, in an order rotated per round, so
drift and other load on the machine hit every method alike. Latencies are medians; the wall
speed-up of a method is the median over rounds of (full run / method run) within the round.

FLOPs come from ``analysis.flops`` on the same graph files; efficiency = wall speed-up / FLOPs
speed-up (1.0: the method reaches its FLOPs limit).

Overhead of ClusCa = clustering (the cluster graphs) + selection (the select graphs, and the
gather of the fresh rows inside the partial graph) + propagation (inside the partial graph).
What runs inside the partial graph is measured with the backend's per-node profiler (ONNX
Runtime's session profile; OpenVINO's ``PERF_COUNT``) on a separate profiled session of the same
graph (profiling slows the session it is on, so the benchmarked engine runs without it): each node
is attributed by the name scope the exporter recorded (``steps.ClusCaOps``: ``clusca.propagate``,
``clusca.gather_rows``, ...), and the shares of the partial graph's node time are applied to the
partial graph's un-profiled median. A variant graph without propagation would measure the same
thing with a second export; the profile needs none and also says where the rest of the partial
step goes.

Floors (CPU): every graph's floor is the larger of the bytes a call must read at this machine's
measured bandwidth and its FLOPs at this machine's measured matrix throughput in the engine's
precision (one large MatMul run by the same backend: ``matmul_throughput``); in bf16 / fp16 the
weights count at 2 bytes. A run's floor is the sum of its calls' floors; ``of_floor`` = run time /
that sum (1.0: every call at its floor).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import Method
from ..engines.base import EngineInfo, cpu_name
from .flops import KINDS, count_engine_dir, graph_kind, schedule_flops
from ..engines.manifest import library_versions
from ..errors import ClusCaError, ConfigError, one_line
from ..files import read_json

log = logging.getLogger(__name__)

FORMAT = 1
METHODS = tuple(m.value for m in (Method.FULL, Method.CLUSCA, Method.FORA, Method.TAYLORSEER))
# versions that change timings; a baseline recorded with others is not comparable
TIMING_VERSIONS = ("clusca-trt", "onnxruntime", "onnxruntime-gpu", "numpy", "python")
BACKEND_VERSIONS = {"torch": ("torch",), "openvino": ("openvino",)}  # checked only for that backend's runs
OVERHEAD = {  # where each part of ClusCa's overhead is measured (graph kinds, or name scopes in the partial graph)
    "clustering": ("graph", ("cluster",)),
    "selection": ("graph", ("select",)),
    "gather": ("partial", ("clusca.fresh_rows", "clusca.gather_rows")),
    "propagation": ("partial", ("clusca.fresh_weights", "clusca.update_weights", "clusca.fresh_forecast",
                                "clusca.fresh_residual", "clusca.spread_index", "clusca.spread", "clusca.propagate",
                                "clusca.keep_state")),
}


class BaselineMismatchError(ClusCaError):
    """A baseline recorded on another device, provider, library versions or settings."""


class LatencyRegressionError(ClusCaError):
    """The run is slower than the baseline beyond the tolerance."""


@dataclass(frozen=True)
class BenchSettings:
    """What to run. ClusCa options left None take the engines' defaults (as ``generate``).

    methods:      run in every round; ``full`` is always added (speed-ups are against it).
    repeats:      interleaved rounds (medians over them).
    warmup_runs:  runs of every method before timing, on a schedule of ``warmup_steps`` steps.
    profile_calls: profiled calls of the partial graph (0: no profile, overhead without propagation).
    """

    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 1.5
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    interval: int | None = None
    propagation: float | None = None
    order: int | None = None
    warmup: int | None = None
    fresh: str | None = None
    update: str | None = None
    correction: float | None = None
    pair: bool | None = None
    repeats: int = 3
    warmup_runs: int = 1
    warmup_steps: int = 8
    profile_calls: int = 5

    def __post_init__(self) -> None:
        methods = tuple(Method.parse(m).value for m in self.methods)
        if Method.FULL.value not in methods:
            methods = (Method.FULL.value,) + methods
        object.__setattr__(self, "methods", tuple(dict.fromkeys(methods)))
        for name in ("steps", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_runs", "profile_calls"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be an integer >= 1, got {self.warmup_steps!r}")


def parse_tolerance(value: "str | float") -> float:
    """``"10%"`` or ``0.1`` -> 0.1."""
    text = str(value).strip()
    try:
        tol = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"max regression must be a fraction or a percentage like 10%, got {value!r}") from None
    if not 0.0 <= tol <= 10.0:
        raise ConfigError(f"max regression must be in 0%..1000%, got {value!r}")
    return tol


# ------------------------------------------------------------------------------------------
# environment


def device_name(info: EngineInfo | None = None) -> str:
    """What ran: the CPU model and usable cores, or the engine's GPU (``info``: the engine's)."""
    if info is not None and info.device != "cpu":
        return f"{info.hardware or 'CUDA device'} ({info.device})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()} ({cores} CPUs)"


def memory_bandwidth(threads: int | None = None, mib: int = 256, calls: int = 5) -> float:
    """Bytes per second ONNX Runtime reads on this machine: a ReduceSum over a ``mib`` MiB float32
    tensor (too large for any cache), with the engine's intra-op threads; the median of ``calls``."""
    from onnx import TensorProto, helper

    n = mib * 2**20 // 4
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "bandwidth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, n // 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    x = np.ones((64, n // 64), np.float32)
    return x.nbytes / _median_seconds(_ort_probe(graph, x, threads), calls)


def _ort_probe(graph, x: np.ndarray, threads: int | None):
    """A call of a one-node probe ``graph`` (input ``x``) on ONNX Runtime's CPU provider, no spinning."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": x})


def _median_seconds(run, calls: int) -> float:
    """The median time of ``calls`` calls of ``run`` after one untimed call."""
    run()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


MATMUL_SHAPE = (1024, 1024, 4096)  # M, K, N of the probe: a transformer MLP's GEMM on 1024 tokens


def matmul_throughput(backend: str = "onnxruntime", precision: str = "fp32", threads: int | None = None,
                      calls: int = 5) -> float:
    """FLOPs per second of one large MatMul (``MATMUL_SHAPE``, constant weights as in a Linear layer)
    run by ``backend`` in ``precision`` with the engine's threads; the median of ``calls``. ONNX
    Runtime runs float32 only; OpenVINO at the inference precision (bf16 on CPUs with bf16 units);
    the torch backend with ``torch.matmul`` in the dtype."""
    m, k, n = MATMUL_SHAPE
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    if backend == "openvino":
        run = _openvino_matmul(x, w, precision, threads)
    elif backend == "torch":
        run = _torch_matmul(x, w, precision, threads)
    else:
        if precision != "fp32":
            raise ConfigError(f"ONNX Runtime runs the float32 graphs: expected precision fp32, got {precision}")
        run = _ort_matmul(x, w, threads)
    return 2.0 * m * k * n / _median_seconds(run, calls)


def _ort_matmul(x, w, threads):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    return _ort_probe(graph, x, threads)


def _openvino_matmul(x, w, precision, threads):
    import openvino as ov
    import openvino.opset13 as ops

    from ..engines.openvino import DEVICE, graph_config

    param = ops.parameter(list(x.shape), np.float32, name="x")
    model = ov.Model([ops.matmul(param, ops.constant(w), False, False)], [param], "matmul")
    compiled = ov.Core().compile_model(model, DEVICE, graph_config("plain", precision, threads, None))
    request = compiled.create_infer_request()
    request.set_tensor(compiled.inputs[0], ov.Tensor(x, shared_memory=True))
    return request.infer


def _torch_matmul(x, w, precision, threads):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = torch.from_numpy(x).to(dtype), torch.from_numpy(w).to(dtype)
    if threads:
        torch.set_num_threads(threads)
    return lambda: torch.matmul(a, b)


def graph_traffic(spec, graph: str, weight_bytes: int) -> dict[str, int]:
    """Bytes one call of ``graph`` must read at least: its weights and its inputs (of a conditioning
    table only the ``graph batch`` rows it gathers), and the bytes of its outputs."""
    from ..spec import TABLE_SUFFIX

    size = {"float32": 4, "int64": 8}
    g = spec.graphs[graph]
    inputs = 0
    for t in g.inputs:
        rows = spec.graph_batch if t.name.endswith(TABLE_SUFFIX) and graph != "cond" else t.shape[0] if t.shape else 1
        inputs += size[t.dtype] * rows * int(np.prod(t.shape[1:]))
    written = sum(size[t.dtype] * int(np.prod(t.shape)) for t in g.outputs)
    return {"read": weight_bytes + inputs, "weights": weight_bytes, "inputs": inputs, "written": written}


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


# ------------------------------------------------------------------------------------------
# profile of one graph


def profile_graph_openvino(manifest, graph: str, precision: str, threads: int | None, calls: int) -> dict[str, float]:
    """Seconds per call of every component (exporter name scope) of ``graph``, from OpenVINO's
    per-node counters (``PERF_COUNT``) of a separate compiled model fed with valid example inputs.
    A node OpenVINO fused keeps the name of one of its ONNX nodes (its time goes to that node's
    component); nodes it made itself (layout reorders, conversions) count as ``fused``."""
    import onnx
    import openvino as ov

    from .flops import _component
    from ..engines.openvino import DEVICE, graph_config
    from ..steps import example_inputs

    spec = manifest.spec
    path = manifest.graph_path(graph)
    proto = onnx.load(str(path), load_external_data=False)
    component = {n.name: _component(n) for n in proto.graph.node}
    component.update({out: _component(n) for n in proto.graph.node for out in n.output})
    del proto
    config = dict(graph_config(graph, precision, threads, None), PERF_COUNT=True)
    compiled = ov.Core().compile_model(str(path), DEVICE, config)
    request = compiled.create_infer_request()
    for t, a in zip(spec.graphs[graph].inputs, example_inputs(spec, graph)):
        request.set_tensor(t.name, ov.Tensor(np.ascontiguousarray(a.numpy())))
    request.infer()  # the first call allocates: its counters are replaced by the next call's
    per: Counter = Counter()
    for _ in range(calls):
        request.infer()
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                per[component.get(info.node_name, "fused")] += info.real_time.total_seconds()
    return {k: v / calls for k, v in per.most_common()}


def profile_graph(manifest, graph: str, provider: str, threads: int | None, calls: int) -> dict[str, float]:
    """Seconds per call of every component (exporter name scope) of ``graph``, from ONNX
    Runtime's node profile of a separate session fed with valid example inputs."""
    import onnx
    import onnxruntime as ort

    from .flops import _component
    from ..engines.ort import PROVIDERS
    from ..steps import example_inputs

    spec = manifest.spec
    path = manifest.graph_path(graph)
    proto = onnx.load(str(path), load_external_data=False)
    component = {n.name: _component(n) for n in proto.graph.node}
    del proto
    with tempfile.TemporaryDirectory(prefix="clusca-profile-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / graph)
        if threads:
            so.intra_op_num_threads = threads
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        session = ort.InferenceSession(str(path), so, providers=providers)
        feeds = {t.name: a.numpy() for t, a in zip(spec.graphs[graph].inputs, example_inputs(spec, graph))}
        for _ in range(calls + 1):  # the first call allocates: left out below
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after_first = runs[1] if len(runs) > 1 else 0
    per: Counter = Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < after_first:
            continue
        name = e["name"][: -len("_kernel_time")].split("/")[0]
        per[component.get(name, "fused")] += e["dur"] * 1e-6
    return {k: v / calls for k, v in per.most_common()}


# ------------------------------------------------------------------------------------------
# the benchmark


def default_inputs(pipe, settings: BenchSettings, labels: list[int] | None = None) -> tuple[tuple, dict]:
    """The family's ``generate`` inputs (positional, keyword) for a benchmark run."""
    family = pipe.model.get("family")
    if family != "dit":
        raise ConfigError(f"bench builds inputs for dit engines, got {family!r}; pass inputs= explicitly")
    labels = labels or list(range(pipe.spec.options.batch))
    return (labels,), {"seed": settings.seed, "steps": settings.steps, "sampler": settings.sampler,
                       "cfg_scale": settings.cfg_scale}


def _run(pipe, method: str, settings: BenchSettings, args: tuple, kwargs: dict, steps: int | None = None):
    kw = dict(kwargs, steps=steps or settings.steps)
    return pipe.generate(
        *args, method=method, interval=settings.interval if method != "full" else None,
        propagation=settings.propagation, order=settings.order, warmup=settings.warmup, fresh=settings.fresh,
        **_rule(settings), **kw,
    )


def _rule(settings: BenchSettings) -> dict:
    """The update rule settings (``generate`` keywords)."""
    return dict(update=settings.update, correction=settings.correction, pair=settings.pair)


def run_bench(pipe, settings: BenchSettings = BenchSettings(), inputs: tuple[tuple, dict] | None = None,
              threads: int | None = None) -> dict:
    """Benchmark the methods of ``settings`` on ``pipe`` (a ``Pipeline``); returns the result dict
    (see ``format_table``; keys ``flops_speedup``, ``wall_speedup``, ``efficiency``,
    ``overhead_share``, ``latency_ms`` per step kind, ``run_ms`` per method, ``methods``).
    ``inputs``: the family's generate inputs (default: ``default_inputs``); ``threads``: the intra-op
    threads the pipeline was loaded with (recorded, and used by the profiled session)."""
    args, kwargs = inputs or default_inputs(pipe, settings)
    configs = {}
    for m in settings.methods:
        try:
            configs[m] = pipe.resolve_config(m, settings.interval if m != "full" else None, settings.propagation,
                                             settings.order, settings.warmup, settings.fresh, **_rule(settings))
        except ConfigError as e:
            if m == Method.FULL.value:
                raise
            log.warning("skipping %s on these engines: %s", m, e)
    methods = list(configs)

    for _ in range(settings.warmup_runs):
        for m in methods:
            _run(pipe, m, settings, args, kwargs, steps=min(settings.steps, settings.warmup_steps))

    runs: dict[str, list] = defaultdict(list)
    for r in range(settings.repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        log.info("round %d/%d: %s", r + 1, settings.repeats, ", ".join(order))
        for m in order:
            runs[m].append(_run(pipe, m, settings, args, kwargs))
    peak_mib = peak_rss_mib()  # before the profile below loads a second session

    per_graph_flops = {}
    flops_detail = {}
    if pipe.manifest is not None:
        counted = count_engine_dir(pipe.manifest)
        per_graph_flops = {n: g.total for n, g in counted.items()}
        flops_detail = {n: g.to_dict() for n, g in counted.items()}

    profile = {}
    if (settings.profile_calls and pipe.manifest is not None and pipe.engine.has_graph("partial")
            and "clusca" in methods):
        if pipe.engine.backend == "onnxruntime":
            profile = profile_graph(pipe.manifest, "partial", pipe.engine.provider, threads, settings.profile_calls)
        elif pipe.engine.backend == "openvino":
            profile = profile_graph_openvino(pipe.manifest, "partial", pipe.engine.precision, threads,
                                             settings.profile_calls)

    result = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": _engine_info(pipe),
        "device": device_name(pipe.engine.info),
        "provider": pipe.engine.provider,
        "backend": pipe.engine.backend,
        "precision": pipe.engine.precision,
        "threads": threads,
        "versions": library_versions(),
        "settings": {**asdict(settings), "methods": methods},
        "flops_per_call": per_graph_flops,
        "methods": {},
    }
    full_runs = [r.seconds for r in runs[Method.FULL.value]]
    for m in methods:
        result["methods"][m] = _method_result(pipe, m, configs[m], runs[m], full_runs, per_graph_flops, profile)
    pooled: dict[str, list[float]] = defaultdict(list)
    by_graph: dict[str, list[float]] = defaultdict(list)
    for m in methods:
        for res in runs[m]:
            for graph, times in res.timings.items():
                pooled[graph_kind(graph)].extend(times)
                by_graph[graph].extend(times)
    result["latency_ms"] = {k: _ms(_median(pooled[k])) for k in KINDS if pooled.get(k)}
    result["run_ms"] = {m: result["methods"][m]["run_ms"] for m in methods}
    head = result["methods"].get(Method.CLUSCA.value) or result["methods"][methods[-1]]
    for key in ("flops_speedup", "wall_speedup", "efficiency", "overhead_share"):
        result[key] = head.get(key)
    result["headline_method"] = head["method"]
    result["partial_profile_ms"] = {k: _ms(v) for k, v in profile.items()}
    result["flops"] = flops_detail
    result["traffic"] = _traffic(pipe, flops_detail, by_graph, threads)
    _run_floors(result, pipe, configs)
    # the engine's own buffers (half-precision caches, ping-pong spares); what else it knows it holds
    result["memory"] = {"peak_rss_mib": round(peak_mib, 1), "state_mib": round(pipe.engine.state_bytes() / 2**20, 1),
                        "device_mib": {k: round(v / 2**20, 1) for k, v in pipe.engine.memory().items()}}
    return result


def graph_floor(read_bytes: float, flops: float, bandwidth: float, matmul: float) -> tuple[float, str]:
    """A call's floor in seconds and what sets it: the larger of its bytes at ``bandwidth`` (B/s)
    and its FLOPs at ``matmul`` (FLOP/s)."""
    memory, compute = read_bytes / bandwidth, flops / matmul
    return (memory, "bytes") if memory >= compute else (compute, "flops")


def _traffic(pipe, flops_detail: dict, by_graph: dict, threads: int | None) -> dict:
    """Per graph: the bytes a call must read (weights at the engine precision's width), its FLOPs,
    its median time, the effective GB/s, and its floor (``graph_floor``: bytes at this machine's
    measured bandwidth or FLOPs at the backend's measured matrix throughput, the larger); only on
    the CPU."""
    if not flops_detail or pipe.engine.info.device != "cpu":
        return {}
    bandwidth = memory_bandwidth(threads)
    precision = pipe.engine.precision
    matmul = matmul_throughput(pipe.engine.backend, precision, threads)
    weight_scale = 0.5 if precision in ("bf16", "fp16") else 1.0  # low-precision weights: 2 bytes a value
    per_graph = {}
    for graph, detail in flops_detail.items():
        times = by_graph.get(graph)
        t = graph_traffic(pipe.spec, graph, int(detail.get("weight_bytes", 0) * weight_scale))
        floor, bound = graph_floor(t["read"], detail.get("total", 0), bandwidth, matmul)
        entry = {"read_mb": round(t["read"] / 1e6, 2), "weights_mb": round(t["weights"] / 1e6, 2),
                 "inputs_mb": round(t["inputs"] / 1e6, 2), "written_mb": round(t["written"] / 1e6, 2),
                 "gflops": round(detail.get("total", 0) / 1e9, 4),
                 "memory_floor_ms": _ms(t["read"] / bandwidth), "compute_floor_ms": _ms(detail.get("total", 0) / matmul),
                 "floor_ms": _ms(floor), "bound": bound}
        if times:
            median = _median(times)
            entry.update(ms=_ms(median), gb_s=round(t["read"] / median / 1e9, 2), of_floor=round(floor / median, 3))
        per_graph[graph] = entry
    return {"bandwidth_gb_s": round(bandwidth / 1e9, 2), "matmul_gflop_s": round(matmul / 1e9, 1),
            "matmul_shape": list(MATMUL_SHAPE), "precision": precision, "threads": threads, "graphs": per_graph}


def _run_floors(result: dict, pipe, configs: dict) -> None:
    """Each method's floor (``floor_ms``): the sum of its calls' floors (``_traffic``); ``x_floor``:
    its run time over that floor."""
    graphs = (result.get("traffic") or {}).get("graphs") or {}
    if not graphs:
        return
    floor_ns = {g: int(round(t["floor_ms"] * 1e6)) for g, t in graphs.items()}  # integers, as schedule_flops sums
    for m, r in result["methods"].items():
        config = configs[m]
        sched = schedule_flops(floor_ns, pipe.spec, pipe.plan(result["settings"]["steps"], config),
                               clustered=config.clusters > 0)
        floor_ms = sched.total / 1e6
        r["floor_ms"] = round(floor_ms, 3)
        r["x_floor"] = round(r["run_ms"] / floor_ms, 3) if floor_ms else None  # 1.0: every call at its floor


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _engine_info(pipe) -> dict:
    m = pipe.manifest
    if m is None:
        return {"directory": None, "key": None, "model": pipe.model.get("family"), "build": asdict(pipe.spec.options)}
    return {"directory": str(m.directory), "key": m.key, "model": m.model.get("name"), "family": m.model.get("family"),
            "build": m.data.get("build")}


def _method_result(pipe, method, config, results, full_runs, per_graph_flops, profile) -> dict:
    seconds = [r.seconds for r in results]
    per_kind: dict[str, list[float]] = defaultdict(list)
    per_run_kind: list[dict[str, float]] = []
    for r in results:
        totals: Counter = Counter()
        for graph, times in r.timings.items():
            per_kind[graph_kind(graph)].extend(times)
            totals[graph_kind(graph)] += sum(times)
        per_run_kind.append(totals)
    steps = sum(results[0].step_counts.values())
    planned = pipe.plan(steps, config)
    out = {
        "method": method,
        "config": {"interval": config.interval, "clusters": config.clusters, "order": config.order,
                   "propagation": config.propagation, "warmup": config.warmup, "fresh": config.fresh.value,
                   "update": config.update.value, "correction": config.correction, "pair": config.pair},
        "runs_ms": [_ms(s) for s in seconds],
        "run_ms": _ms(_median(seconds)),
        "step_ms": _ms(_median(seconds) / steps),
        "latency_ms": {k: _ms(_median(v)) for k, v in per_kind.items()},
        "host_ms": _ms(_median([s - sum(t.values()) for s, t in zip(seconds, per_run_kind)])),
        "wall_speedup": round(float(statistics.median(f / s for f, s in zip(full_runs, seconds))), 4),
    }
    if per_graph_flops:
        sched = schedule_flops(per_graph_flops, pipe.spec, planned, clustered=config.clusters > 0)
        full = schedule_flops(per_graph_flops, pipe.spec, pipe.plan(steps, config.replace(interval=1, clusters=0)),
                              clustered=False)
        out["flops"] = sched.total
        out["calls"] = sched.calls
        out["flops_speedup"] = round(full.total / sched.total, 4)
        out["efficiency"] = round(out["wall_speedup"] / out["flops_speedup"], 4)
    if config.clusters > 0:
        out.update(_overhead(per_run_kind, seconds, profile))
    return out


def _overhead(per_run_kind: list[dict[str, float]], seconds: list[float], profile: dict[str, float]) -> dict:
    node_total = sum(profile.values())
    if node_total and not any(c.startswith("clusca.") for c in profile):
        log.warning("the partial graph has no clusca.* name scopes (exported by an older clusca-trt): propagation "
                    "cannot be told apart; rebuild the engines with clusca-trt build --force")
        node_total = 0.0
    shares = {part: (sum(profile.get(c, 0.0) for c in comps) / node_total if node_total else None)
              for part, (where, comps) in OVERHEAD.items() if where == "partial"}
    parts: dict[str, list[float]] = defaultdict(list)
    totals = []
    for kinds, s in zip(per_run_kind, seconds):
        spent = {"clustering": kinds.get("cluster", 0.0), "selection": kinds.get("select", 0.0)}
        for part, share in shares.items():
            spent[part] = kinds.get("partial", 0.0) * share if share is not None else None
        for part, v in spent.items():
            parts[part].append(v)
        totals.append(sum(v for v in spent.values() if v is not None) / s)
    return {
        "overhead_ms": {part: _ms(_median(v)) for part, v in parts.items()},
        "overhead_share": round(float(statistics.median(totals)), 5),
        "overhead_measured": "clustering, selection" + (", gather, propagation (the backend's node profile)" if node_total else
                                                         " (propagation not measured: no profile)"),
    }


# ------------------------------------------------------------------------------------------
# output


def format_table(result: dict) -> str:
    e, s = result["engine"], result["settings"]
    b = e.get("build") or {}
    lines = [
        f"engines  {e.get('directory')} ({e.get('model')}, K={b.get('clusters')}, O={b.get('order')}, batch {b.get('batch')})",
        f"device   {result['device']}, {result['backend']}" + (f"/{result['provider']}" if result.get("provider") else "")
        + f" {result.get('precision', 'fp32')}"
        + (f", {result['threads']} threads" if result.get("threads") else ""),
        f"run      {s['steps']} {s['sampler']} steps, {s['repeats']} interleaved rounds after {s['warmup_runs']} warm-up; medians",
        "",
        f"{'method':<11}{'N':>3}{'K':>4}{'O':>3}{'run ms':>11}{'ms/step':>9}{'wall x':>8}{'FLOPs x':>9}{'effic.':>8}"
        f"{'overhead':>10}",
    ]
    for m, r in result["methods"].items():
        c = r["config"]
        ov = r.get("overhead_share")
        lines.append(
            f"{m:<11}{c['interval']:>3}{c['clusters']:>4}{c['order']:>3}{_f(r['run_ms'], 1):>11}{_f(r['step_ms'], 1):>9}"
            f"{_f(r['wall_speedup'], 2):>8}{_f(r.get('flops_speedup'), 2):>9}{_f(r.get('efficiency'), 2):>8}"
            f"{(_f(100 * ov, 1) + '%') if ov is not None else '':>10}"
        )
    lines.append("")
    lines.append("median per call, ms: " + " | ".join(f"{k} {_f(v, 2)}" for k, v in result["latency_ms"].items()))
    for m, r in result["methods"].items():
        if r.get("overhead_ms"):
            parts = ", ".join(f"{k} {_f(v, 1)}" for k, v in r["overhead_ms"].items())
            lines.append(f"overhead of {m} per run, ms: {parts} = {_f(100 * r['overhead_share'], 2)}% of the run")
    prof = result.get("partial_profile_ms") or {}
    if prof:
        total = sum(prof.values())
        top = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in list(prof.items())[:8])
        lines.append(f"partial graph by component ({result['backend']} profile, {_f(total, 1)} ms of node time): {top}")
    traffic = result.get("traffic") or {}
    if traffic:
        matmul = (f", matrix throughput {traffic['matmul_gflop_s']} GFLOP/s in {traffic['precision']} "
                  f"({result['backend']} MatMul {'x'.join(map(str, traffic['matmul_shape']))})"
                  if "matmul_gflop_s" in traffic else "")
        lines.append(f"floors   this machine reads {traffic['bandwidth_gb_s']} GB/s (ONNX Runtime ReduceSum over 256 MiB)"
                     f"{matmul}; per call, bytes read (weights + inputs), time, and the floor (bytes or FLOPs):")
        for g, t in traffic["graphs"].items():
            if "ms" in t:
                lines.append(f"  {g:<12}{t['read_mb']:>10.1f} MB (weights {t['weights_mb']:.1f}) {t['ms']:>9.2f} ms "
                             f"{t['gb_s']:>6.2f} GB/s  floor {t['floor_ms']:.2f} ms by {t.get('bound', 'bytes')} "
                             f"(at {100 * t['of_floor']:.0f}% of floor speed)")
        runs = [f"{m} {_f(r['run_ms'], 1)} ms = {_f(r['x_floor'], 2)}x its floor {_f(r['floor_ms'], 1)} ms"
                for m, r in result["methods"].items() if r.get("x_floor") is not None]
        if runs:
            lines.append("runs vs the sum of their calls' floors: " + "; ".join(runs))
    mem = result["memory"]
    lines.append(f"memory   peak RSS {mem['peak_rss_mib']} MiB (process), engine state {mem['state_mib']} MiB")
    return "\n".join(lines)


def _f(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------
# regression check


def load_baseline(path: "str | Path") -> dict:
    path = Path(path)
    try:
        data = read_json(path)  # bounded: size and nesting
    except (OSError, ValueError) as e:
        raise ConfigError(f"expected a benchmark JSON written by clusca-trt bench --json at {path}: {one_line(e)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "run_ms" not in data:
        raise ConfigError(f"expected a benchmark JSON (format {FORMAT}) written by clusca-trt bench --json at {path}, got another file")
    return data


def comparable(result: dict, baseline: dict) -> None:
    """Raise ``BaselineMismatchError`` unless the two were measured alike: same device,
    provider, backend, threads, engines, settings and timing-relevant library versions."""
    checks = [
        ("device", baseline.get("device"), result.get("device")),
        ("provider", baseline.get("provider"), result.get("provider")),
        ("backend", baseline.get("backend"), result.get("backend")),
        ("precision", baseline.get("precision", "fp32"), result.get("precision", "fp32")),
        ("threads", baseline.get("threads"), result.get("threads")),
        ("engines (key)", (baseline.get("engine") or {}).get("key"), (result.get("engine") or {}).get("key")),
    ]
    bv, rv = baseline.get("versions") or {}, result.get("versions") or {}
    names = TIMING_VERSIONS + BACKEND_VERSIONS.get(result.get("backend"), ())
    checks += [(f"{n} version", bv.get(n), rv.get(n)) for n in names]
    bs, rs = baseline.get("settings") or {}, result.get("settings") or {}
    for key in ("steps", "sampler", "interval", "propagation", "order", "warmup", "fresh", "update", "correction",
                "pair"):
        checks.append((f"setting {key}", bs.get(key), rs.get(key)))
    for what, base, now in checks:
        if base != now:
            raise BaselineMismatchError(
                f"baseline not comparable: it was recorded with {what} {base!r}, this run has {now!r}; "
                f"record a new baseline here with clusca-trt bench --json"
            )


@dataclass(frozen=True)
class Regression:
    method: str
    baseline_ms: float
    current_ms: float

    @property
    def change(self) -> float:
        return self.current_ms / self.baseline_ms - 1.0

    def __str__(self) -> str:
        return f"{self.method} run {self.current_ms:.1f} ms vs baseline {self.baseline_ms:.1f} ms ({100 * self.change:+.1f}%)"


def compare(result: dict, baseline: dict, max_regression: float) -> list[Regression]:
    """Whole sampling runs (median, per method in both) slower than the baseline by more than
    ``max_regression`` (a fraction). Refuses (``BaselineMismatchError``) a baseline measured otherwise."""
    comparable(result, baseline)
    common = [m for m in result["run_ms"] if m in baseline["run_ms"]]
    if not common:
        raise BaselineMismatchError(
            f"baseline not comparable: it has methods {sorted(baseline['run_ms'])}, this run {sorted(result['run_ms'])}"
        )
    out = []
    for m in common:
        base, now = float(baseline["run_ms"][m]), float(result["run_ms"][m])
        if now > base * (1.0 + max_regression):
            out.append(Regression(m, base, now))
    return out


def check_regression(result: dict, baseline: dict, max_regression: "float | str" = 0.10) -> None:
    """``compare`` and raise ``LatencyRegressionError`` naming every regression (for test suites)."""
    tol = parse_tolerance(max_regression)
    regressions = compare(result, baseline, tol)
    if regressions:
        raise LatencyRegressionError(
            f"latency regression beyond {100 * tol:.0f}%: " + "; ".join(str(r) for r in regressions)
        )
