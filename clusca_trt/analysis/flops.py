"""Analytic FLOPs of the exported graphs: ONNX graph -> FLOPs per node, per graph, per step kind
and per sampling schedule; the FLOPs speed-up of a ClusCa configuration is the limit of its
wall speed-up.

Counting (after ``onnx.shape_inference``, static shapes; a multiply-add is 2 FLOPs):

* ``MatMul``: 2 x (output elements) x (contracted size); ``Gemm``: 2MNK, plus MN for its bias;
  ``Conv``: 2 x (output elements) x (C_in / groups) x (kernel size), plus its bias;
  ``Einsum``: 0 for a pure permutation, else 2 x the product of every index's size.
  Attention is the MatMuls and the Softmax it is exported as.
* element-wise (Add, Mul, Where, Tanh, Equal, ...): 1 per output element;
  ``Softmax``: 5, ``LayerNormalization``: 5 (+1 per scale / bias input) per element;
  reductions and ArgMin/ArgMax: 1 per input element.
* data movement (Reshape, Transpose, Gather, Concat, Split, Expand, Cast, OneHot, ...): 0.
  What it costs in time shows as ``bytes_written`` (every node's output bytes, views excluded).

Every node is attributed to a *component*: the outermost module it was traced in, with block
indices removed (``attn``, ``mlp``, ``adaLN_modulation``, ``final_layer``; ``clusca.propagate``,
``clusca.taylor_forecast``, ... for the ClusCa operations; ``step`` for the glue between them:
residual adds, gates, cache slicing and stacking). The exporter records it on every node.

A schedule costs, per step: FULL: the full graph (+ the cluster graphs when k-means runs after
it), or the plain graph where no cache is refreshed (method full); PARTIAL: the select graphs +
the partial graph; FORECAST: the forecast graph; and once per ``cond_steps`` steps the cond graph
(the conditioning of those steps). The host sampler update (DDIM/DDPM, guidance: a few
element-wise ops over the latent) is left out.

``extrapolated_flops`` counts real configs (DiT-XL/2) without exporting them whole: it exports
the graphs at depth 1 and 2, takes the per-block difference and scales it to the full depth
(every count is affine in the depth; a test checks it against a directly counted graph).
"""

from __future__ import annotations

import ast
import logging
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ClusCaConfig
from ..errors import ConfigError, one_line
from ..schedule import PlannedStep, StepKind, plan
from ..spec import GRAPH_COND, GRAPH_FORECAST, GRAPH_FULL, GRAPH_PARTIAL, GRAPH_PLAIN, WEIGHTED_GRAPHS, ExportSpec

log = logging.getLogger(__name__)

_ELEMENTWISE = frozenset(
    "Add Sub Mul Div Pow Sqrt Reciprocal Neg Abs Exp Log Tanh Sigmoid Relu Erf Sin Cos Max Min Where Equal Less "
    "LessOrEqual Greater GreaterOrEqual Not And Or Xor Clip Floor Ceil Round Sign Softplus LeakyRelu HardSigmoid "
    "Mod IsNaN IsInf Mean Sum Elu Selu Celu HardSwish Mish PRelu ThresholdedRelu BitwiseAnd BitwiseOr".split()
)
_PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 5, "Gelu": 8, "CumSum": 1}
_REDUCE = {
    "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1, "ArgMax": 1, "ArgMin": 1,
    "ReduceL1": 2, "ReduceL2": 2, "ReduceSumSquare": 2, "ReduceLogSumExp": 3,
}
_MOVE = frozenset(
    "Reshape Transpose Gather GatherElements GatherND Scatter ScatterElements ScatterND Concat Split Slice Expand "
    "Squeeze Unsqueeze Identity Shape Size Constant ConstantOfShape Range Tile Pad Cast CastLike OneHot Flatten "
    "Trilu NonZero Dropout".split()
)
_VIEWS = frozenset("Reshape Squeeze Unsqueeze Identity Flatten Shape Size Constant Dropout".split())
_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}

CATEGORIES = ("matmul", "conv", "softmax", "norm", "elementwise", "reduction", "other")


class FlopsError(ValueError):
    """A graph whose shapes cannot be inferred statically."""


@dataclass(frozen=True)
class GraphFlops:
    """FLOPs of one graph. ``by_category``/``by_component`` sum to ``total``."""

    name: str
    total: int
    by_category: dict[str, int] = field(default_factory=dict)
    by_component: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    weight_bytes: int = 0
    uncounted_ops: tuple[str, ...] = ()  # op types this counter does not know (counted as 0)

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_category": dict(self.by_category),
            "by_component": dict(self.by_component),
            "bytes_written": self.bytes_written,
            "weight_bytes": self.weight_bytes,
            "uncounted_ops": list(self.uncounted_ops),
        }


# ------------------------------------------------------------------------------------------
# one node, one graph


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape else 1


def node_flops(op: str, in_shapes: list, out_shapes: list, attrs: dict) -> tuple[int, str]:
    """(FLOPs, category) of one node, from its input and output shapes (None: unknown/absent)."""
    out = out_shapes[0] if out_shapes else None
    if op == "MatMul":
        return 2 * _numel(out) * in_shapes[0][-1], "matmul"
    if op == "Gemm":
        a = in_shapes[0]
        k = a[0] if attrs.get("transA", 0) else a[1]
        bias = _numel(out) if len(in_shapes) > 2 and in_shapes[2] is not None else 0
        return 2 * _numel(out) * k + bias, "matmul"
    if op == "Conv":
        w = in_shapes[1]
        bias = _numel(out) if len(in_shapes) > 2 and in_shapes[2] is not None else 0
        return 2 * _numel(out) * w[1] * _numel(w[2:]) + bias, "conv"
    if op == "Einsum":
        return _einsum_flops(attrs["equation"], in_shapes), "matmul"
    if op in _ELEMENTWISE:
        return _numel(out), "elementwise"
    if op == "LayerNormalization":
        extra = sum(1 for s in in_shapes[1:] if s is not None)
        return (5 + extra) * _numel(in_shapes[0]), "norm"
    if op in _PER_ELEMENT:
        return _PER_ELEMENT[op] * _numel(out), "softmax" if "Softmax" in op else "elementwise"
    if op in _REDUCE:
        return _REDUCE[op] * _numel(in_shapes[0]), "reduction"
    if op in _MOVE:
        return 0, "other"
    raise KeyError(op)


def _einsum_flops(equation: str, in_shapes: list) -> int:
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, in_shapes):
        for letter, dim in zip(term, shape):
            sizes[letter] = dim
    summed = set("".join(terms)) - set(rhs)
    if len(terms) == 1 and not summed:
        return 0  # a permutation
    return 2 * _numel(sizes.values())


def _component(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return "unknown"
            for s in scopes:
                if s.startswith("clusca."):
                    return s
            if len(scopes) < 3:  # root and the op itself: glue code between modules
                return "step"
            path = re.sub(r"^(adapter\.)?(model\.)?", "", scopes[1])
            return re.sub(r"\w*blocks\.\d+\.", "", path) or "step"
    return "unknown"


def _shapes(model) -> tuple[dict[str, tuple], dict[str, int]]:
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, int] = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[v.name] = tuple(d.dim_value for d in tt.shape.dim)
            dtypes[v.name] = tt.elem_type
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = init.data_type
    return shapes, dtypes


def count_model(model, name: str = "graph") -> GraphFlops:
    """FLOPs of an ONNX ``ModelProto`` (shapes inferred here; weights need not be loaded)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises its own InferenceError and others
        raise FlopsError(f"cannot infer the shapes of graph {name}: {one_line(e)}") from e
    shapes, dtypes = _shapes(inferred)
    for node in inferred.graph.node:  # Constant nodes carry their shape in the attribute
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    by_cat: Counter = Counter()
    by_comp: Counter = Counter()
    unknown: set[str] = set()
    written = 0
    for node in inferred.graph.node:
        if node.domain not in ("", "ai.onnx"):
            unknown.add(f"{node.domain}.{node.op_type}")
            continue
        ins = [shapes.get(i) if i else None for i in node.input]
        outs = [shapes.get(o) for o in node.output]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if isinstance(attrs.get("equation"), bytes):
            attrs["equation"] = attrs["equation"].decode()
        needed = outs[:1] if node.op_type not in ("MatMul", "Gemm", "Conv", "Einsum", "LayerNormalization") else ins[:2]
        if node.op_type in _REDUCE:
            needed = ins[:1]
        if node.op_type not in _MOVE and any(s is None for s in needed):
            raise FlopsError(f"graph {name}: no static shape for node {node.name} ({node.op_type})")
        try:
            flops, cat = node_flops(node.op_type, ins, outs, attrs)
        except KeyError:
            unknown.add(node.op_type)
            flops, cat = 0, "other"
        by_cat[cat] += flops
        by_comp[_component(node)] += flops
        if node.op_type not in _VIEWS:
            for o in node.output:
                if o in shapes:
                    written += _numel(shapes[o]) * _DTYPE_BYTES.get(dtypes.get(o, 1), 4)
    if unknown:
        log.warning("graph %s: op types counted as 0 FLOPs: %s", name, ", ".join(sorted(unknown)))
    weights = sum(_numel(i.dims) * _DTYPE_BYTES.get(i.data_type, 4) for i in model.graph.initializer)
    return GraphFlops(
        name,
        int(sum(by_cat.values())),
        {c: int(by_cat.get(c, 0)) for c in CATEGORIES},
        dict(sorted(((k, int(v)) for k, v in by_comp.items() if v), key=lambda kv: -kv[1])),
        int(written),
        int(weights),
        tuple(sorted(unknown)),
    )


def count_file(path: Path, name: str | None = None) -> GraphFlops:
    """FLOPs of an ``.onnx`` file (external weight data is not read: shapes suffice)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return count_model(model, name or Path(path).stem)


def count_engine_dir(manifest) -> dict[str, GraphFlops]:
    """Every graph of an engine directory (a ``Manifest``), by graph name."""
    return {name: count_file(path, name) for name, path in manifest.graph_paths().items()}


# ------------------------------------------------------------------------------------------
# schedules


@dataclass(frozen=True)
class ScheduleFlops:
    """FLOPs of one sampling run (one engine batch).

    calls: graph calls per step kind (full, cluster, select, partial, forecast);
    by_kind: FLOPs per step kind; total: their sum.
    """

    steps: int
    calls: dict[str, int]
    by_kind: dict[str, int]
    total: int

    def to_dict(self) -> dict:
        return {"steps": self.steps, "calls": dict(self.calls), "by_kind": dict(self.by_kind), "total": self.total}


KINDS = ("cond", "plain", "full", "cluster", "select", "partial", "forecast")


def graph_kind(graph: str) -> str:
    """The step kind a graph's time and FLOPs belong to: cluster_<g> -> cluster, select_<g> -> select."""
    return graph.split("_", 1)[0] if graph.startswith(("cluster_", "select_")) else graph


def schedule_flops(per_graph: dict[str, int], spec: ExportSpec, planned: list[PlannedStep], clustered: bool = True) -> ScheduleFlops:
    """FLOPs of the planned steps. ``per_graph``: FLOPs per graph call, by graph name.
    ``clustered``: whether the run clusters (ClusCa; not TaylorSeer/FORA/full)."""
    calls: Counter = Counter()
    flops: Counter = Counter()

    def add(graph: str) -> None:
        calls[graph_kind(graph)] += 1
        flops[graph_kind(graph)] += per_graph[graph]

    groups = [g.name for g in spec.clustered_groups] if clustered else []
    for s, p in enumerate(planned):
        if GRAPH_COND in per_graph and s % spec.options.cond_steps == 0:
            add(GRAPH_COND)
        if p.kind is StepKind.FULL and not p.cache and GRAPH_PLAIN in per_graph:
            add(GRAPH_PLAIN)
        elif p.kind is StepKind.FULL:
            add(GRAPH_FULL)
            if p.cluster:
                for g in groups:
                    add(f"cluster_{g}")
        elif p.kind is StepKind.PARTIAL:
            for g in groups:
                add(f"select_{g}")
            add(GRAPH_PARTIAL)
        else:
            add(GRAPH_FORECAST)
    by_kind = {k: int(flops.get(k, 0)) for k in KINDS}
    return ScheduleFlops(len(planned), {k: int(calls.get(k, 0)) for k in KINDS}, by_kind, int(sum(by_kind.values())))


def flops_speedup(per_graph: dict[str, int], spec: ExportSpec, config: ClusCaConfig, steps: int) -> float:
    """FLOPs of ``steps`` full steps over the FLOPs of the ``config`` schedule."""
    order = spec.options.order
    full = schedule_flops(per_graph, spec, plan(steps, config.replace(interval=1, clusters=0), order), clustered=False)
    ours = schedule_flops(per_graph, spec, plan(steps, config, order), clustered=config.clusters > 0)
    return full.total / ours.total


# ------------------------------------------------------------------------------------------
# real configs without exporting them whole


@dataclass(frozen=True)
class Extrapolated:
    """Per-graph FLOPs at ``depth`` blocks, from exports at two smaller depths; ``spec`` is the
    full-depth model's spec (its schedules are what the counts are for)."""

    spec: ExportSpec
    depth: int
    per_graph: dict[str, GraphFlops]
    per_block: dict[str, int]
    probe_depths: tuple[int, int]


def _affine(a: int, b: int, da: int, db: int, depth: int) -> int:
    slope, rem = divmod(b - a, db - da)
    if rem:
        raise FlopsError(f"FLOPs are not affine in the depth: {a} at {da}, {b} at {db} blocks")
    return a + slope * (depth - da)


def extrapolate(low: GraphFlops, high: GraphFlops, low_depth: int, high_depth: int, depth: int) -> GraphFlops:
    """The count at ``depth`` blocks from counts at two depths (every term is affine in the depth)."""

    def scale(x: dict, y: dict) -> dict:
        return {k: _affine(x.get(k, 0), y.get(k, 0), low_depth, high_depth, depth) for k in sorted(set(x) | set(y))}

    return GraphFlops(
        low.name,
        _affine(low.total, high.total, low_depth, high_depth, depth),
        scale(low.by_category, high.by_category),
        dict(sorted(scale(low.by_component, high.by_component).items(), key=lambda kv: -kv[1])),
        _affine(low.bytes_written, high.bytes_written, low_depth, high_depth, depth),
        _affine(low.weight_bytes, high.weight_bytes, low_depth, high_depth, depth),
        tuple(sorted(set(low.uncounted_ops) | set(high.uncounted_ops))),
    )


def extrapolated_flops(make_adapter, depth: int, options, graphs: tuple[str, ...] | None = None,
                       probe_depths: tuple[int, int] = (1, 2)) -> Extrapolated:
    """FLOPs of every graph of a ``depth``-block model, exporting only ``probe_depths`` blocks.

    ``make_adapter(d)`` returns the family's adapter with ``d`` blocks (weights do not matter).
    """
    from ..exporters import export_graph

    counts: dict[int, dict[str, GraphFlops]] = {}
    with tempfile.TemporaryDirectory(prefix="clusca-flops-") as tmp:
        for d in probe_depths:
            adapter = make_adapter(d)
            spec = adapter.export_spec(options)
            names = graphs or tuple(spec.graphs)
            counts[d] = {}
            for name in names:
                log.info("counting FLOPs of the %s graph at depth %d", name, d)
                path = export_graph(adapter, spec, name, Path(tmp) / f"{name}-{d}.onnx")
                counts[d][name] = count_file(path, name)
    lo, hi = probe_depths
    per_graph = {n: extrapolate(counts[lo][n], counts[hi][n], lo, hi, depth) for n in counts[lo]}
    per_block = {n: (counts[hi][n].total - counts[lo][n].total) // (hi - lo) for n in counts[lo]}
    import torch

    with torch.device("meta"):  # the full-depth spec, without allocating the full model
        spec = make_adapter(depth).export_spec(options)
    return Extrapolated(spec, depth, per_graph, per_block, probe_depths)


def dit_flops(model_name: str, options, probe_depths: tuple[int, int] = (1, 2)) -> Extrapolated:
    """Every graph of a named DiT config (``dit-xl-2``, ...) at its full depth, by extrapolation."""
    from ..models import dit

    if model_name not in dit.NAMED_CONFIGS:
        raise ConfigError(f"model must be one of {', '.join(dit.NAMED_CONFIGS)}, got {model_name!r}")
    cfg = dit.NAMED_CONFIGS[model_name]
    return extrapolated_flops(lambda d: dit.probe_adapter(cfg, d), cfg.depth, options, probe_depths=probe_depths)


# ------------------------------------------------------------------------------------------
# dual-stream families (FLUX, HunyuanVideo): carried from small probes to the real size
#
# The model graphs are exported at the real token counts and head width with 1, 2 and 3 heads and
# (1, 1), (2, 1), (1, 2) double- and single-stream blocks, counted, and carried to the real size
# exactly: at a fixed head count every count is affine in each block count; at a fixed head width
# it is a polynomial of degree <= 2 in the head count (projections and MLPs are quadratic in the
# width, attention, norms, rotary and element-wise work linear), so three head counts fix it
# (Lagrange, integer-exact). The probes have random weights: with equal (e.g. all-zero) weights the
# exporter merges identical initializers and projections and the count comes out low. The k-means
# and selection graphs have no weights and are exported at the real size directly. The family
# module (the module of the config's class) provides ``probe_adapter(cfg, heads, double, single)``
# and ``export_spec(cfg, options)``.

HEAD_PROBES = (1, 2, 3)
DEPTH_PROBES = ((1, 1), (2, 1), (1, 2))


@dataclass(frozen=True)
class ProbedFlops:
    """Per-graph FLOPs of the configuration ``spec`` was made for, and the probes they came from."""

    spec: ExportSpec
    per_graph: dict[str, GraphFlops]
    head_probes: tuple[int, ...]
    depth_probes: tuple[tuple[int, int], ...]


def _combine(terms: list[tuple[int, GraphFlops]], name: str) -> GraphFlops:
    """``sum(weight * count)`` over every field of the counts (weights are integers)."""

    def total(field: str) -> int:
        return sum(w * getattr(g, field) for w, g in terms)

    def by(field: str) -> dict[str, int]:
        keys = sorted(set().union(*(getattr(g, field).keys() for _, g in terms)))
        return {k: sum(w * getattr(g, field).get(k, 0) for w, g in terms) for k in keys}

    return GraphFlops(
        name, total("total"), by("by_category"), by("by_component"), total("bytes_written"), total("weight_bytes"),
        tuple(sorted(set().union(*(g.uncounted_ops for _, g in terms)))),
    )


def at_depth(counts: dict[tuple[int, int], GraphFlops], double: int, single: int) -> GraphFlops:
    """The count at ``double`` / ``single`` blocks from counts at (1, 1), (2, 1) and (1, 2) blocks."""
    base, d2, s2 = counts[1, 1], counts[2, 1], counts[1, 2]
    return _combine([(1 - (double - 1) - (single - 1), base), (double - 1, d2), (single - 1, s2)], base.name)


def lagrange_weights(nodes: tuple[int, ...], x: int) -> list[int]:
    """Integer weights ``w_i`` with ``p(x) = sum_i w_i p(nodes_i)`` for every polynomial of degree < len(nodes)."""
    weights = []
    for i, xi in enumerate(nodes):
        num, den = 1, 1
        for j, xj in enumerate(nodes):
            if j != i:
                num *= x - xj
                den *= xi - xj
        if num % den:
            raise FlopsError(f"Lagrange weight of node {xi} at {x} is not an integer: {num}/{den}")
        weights.append(num // den)
    return weights


def at_heads(counts: dict[int, GraphFlops], heads: int) -> GraphFlops:
    nodes = tuple(sorted(counts))
    return _combine(list(zip(lagrange_weights(nodes, heads), (counts[h] for h in nodes))), counts[nodes[0]].name)


def _family(cfg):
    """The model family module a config belongs to (it defines ``probe_adapter`` and ``export_spec``)."""
    import sys

    return sys.modules[type(cfg).__module__]


def probe_counts(cfg, options, heads: int, double: int, single: int, graphs, tmp: Path) -> dict[str, GraphFlops]:
    """Export ``graphs`` of ``cfg`` with ``heads`` heads and the given block counts (random weights) and count them."""
    from ..exporters import export_graph

    adapter = _family(cfg).probe_adapter(cfg, heads, double, single)
    spec = adapter.export_spec(options)
    out = {}
    for name in graphs:
        log.info("counting FLOPs of the %s graph at %d heads, %d + %d blocks", name, heads, double, single)
        out[name] = count_file(export_graph(adapter, spec, name, tmp / f"{name}-{heads}-{double}-{single}.onnx"), name)
    return out


def dual_stream_flops(
    cfg,
    options,
    graphs: tuple[str, ...] | None = None,
    head_probes: tuple[int, ...] = HEAD_PROBES,
    depth_probes: tuple[tuple[int, int], ...] = DEPTH_PROBES,
) -> ProbedFlops:
    """Every graph's FLOPs for ``cfg`` (a FLUX or HunyuanVideo config), by graph name.

    ``graphs``: the graphs to count (default: full, partial and every cluster/select graph: what a
    ClusCa schedule calls; add ``forecast`` for TaylorSeer/FORA)."""
    from ..exporters import export_graph

    if len(head_probes) != 3 or sorted(depth_probes) != sorted(DEPTH_PROBES):
        raise ConfigError(
            f"expected 3 head probes and depth probes (1, 1), (2, 1), (1, 2), got {head_probes}, {depth_probes}"
        )
    spec = _family(cfg).export_spec(cfg, options)
    graphs = graphs or tuple(n for n in spec.graphs if n != GRAPH_FORECAST)
    model_graphs = [g for g in graphs if g in WEIGHTED_GRAPHS]
    per_graph: dict[str, GraphFlops] = {}
    with tempfile.TemporaryDirectory(prefix="clusca-flops-") as tmp:
        by_heads: dict[str, dict[int, GraphFlops]] = {g: {} for g in model_graphs}
        for h in head_probes:
            by_depth: dict[str, dict[tuple[int, int], GraphFlops]] = {g: {} for g in model_graphs}
            for d, s in depth_probes:
                for g, c in probe_counts(cfg, options, h, d, s, model_graphs, Path(tmp)).items():
                    by_depth[g][d, s] = c
            for g in model_graphs:
                by_heads[g][h] = at_depth(by_depth[g], cfg.num_layers, cfg.num_single_layers)
        for g in model_graphs:
            per_graph[g] = at_heads(by_heads[g], cfg.num_attention_heads)
        for g in graphs:
            if g not in WEIGHTED_GRAPHS:  # k-means and selection: no weights, exported at the real size
                log.info("counting FLOPs of the %s graph", g)
                per_graph[g] = count_file(export_graph(None, spec, g, Path(tmp) / f"{g}.onnx"), g)
    return ProbedFlops(spec, per_graph, tuple(head_probes), tuple(depth_probes))


def flux_flops(options, cfg=None, graphs: tuple[str, ...] | None = None) -> dict[str, GraphFlops]:
    """FLOPs of every graph of a build of ``cfg`` (default: FLUX.1-dev at 1024 x 1024), by graph name."""
    from ..models import flux

    return dual_stream_flops(cfg or flux.NAMED_CONFIGS["flux-dev"], options, graphs).per_graph


def hunyuan_video_flops(options, cfg=None, graphs: tuple[str, ...] | None = None,
                        head_probes: tuple[int, ...] = HEAD_PROBES,
                        depth_probes: tuple[tuple[int, int], ...] = DEPTH_PROBES) -> ProbedFlops:
    """Every graph's FLOPs for ``cfg`` (default: the released HunyuanVideo at 480 x 640 x 65 frames)."""
    from ..models import hunyuan_video as hv

    return dual_stream_flops(cfg or hv.NAMED_CONFIGS["hunyuan-video"], options, graphs, head_probes, depth_probes)
