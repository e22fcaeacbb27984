"""FLOPs of HunyuanVideo's real configuration (13B: 24 heads x 128, 20 dual- and 40 single-stream
blocks, 480 x 640 x 65 frames = 20400 video + 256 text tokens) without exporting it whole.

The graphs are exported at the real token counts and head width (128) but with few heads and
few blocks, counted with ``engines.flops`` (the same node rules as every other count), and the
counts are carried to the real size exactly:

* at a fixed head count every count is affine in the number of dual-stream blocks ``d`` and of
  single-stream blocks ``s``: ``f(d, s) = f(1, 1) + (d - 1) (f(2, 1) - f(1, 1)) + (s - 1) (f(1, 2) - f(1, 1))``;
* at a fixed head width every count is a polynomial of degree <= 2 in the head count ``h``
  (projections and MLPs are quadratic in the width ``128 h``; attention, softmax, norms, rotary
  and element-wise work are linear in it), so three head counts fix it (Lagrange, integer-exact).

The k-means and selection graphs have no weights and are exported at the real size directly.
A test checks both rules against directly counted graphs.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..spec import BuildOptions, ExportSpec
from .flops import FlopsError, GraphFlops, count_file

log = logging.getLogger(__name__)

MODEL_GRAPHS = ("full", "partial")


@dataclass(frozen=True)
class VideoFlops:
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


def probe_counts(
    cfg, options: BuildOptions, heads: int, double: int, single: int, graphs, tmp: Path
) -> dict[str, GraphFlops]:
    """Export ``graphs`` of ``cfg`` with ``heads`` heads and the given block counts (random weights) and count them."""
    from ..exporters import export_graph
    from ..models import hunyuan_video as hv

    small = cfg.replace(num_attention_heads=heads, num_layers=double, num_single_layers=single)
    adapter = hv.HunyuanVideoAdapter(hv.init_random(small, seed=0), small)
    spec = adapter.export_spec(options)
    out = {}
    for name in graphs:
        log.info("counting FLOPs of the %s graph at %d heads, %d + %d blocks", name, heads, double, single)
        path = export_graph(adapter, spec, name, tmp / f"{name}-{heads}-{double}-{single}.onnx")
        out[name] = count_file(path, name)
    return out


def hunyuan_video_flops(
    options: BuildOptions,
    cfg=None,
    graphs: tuple[str, ...] | None = None,
    head_probes: tuple[int, ...] = (1, 2, 3),
    depth_probes: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2)),
) -> VideoFlops:
    """Every graph's FLOPs for ``cfg`` (default: the released HunyuanVideo at 480 x 640 x 65 frames).

    ``graphs``: the graphs to count (default: full, partial and every cluster/select graph: what a
    ClusCa schedule calls)."""
    from ..exporters import export_graph
    from ..models import hunyuan_video as hv

    cfg = cfg or hv.NAMED_CONFIGS["hunyuan-video"]
    spec = hv.export_spec(cfg, options)
    graphs = graphs or tuple(n for n in spec.graphs if n != "forecast")
    if len(head_probes) != 3 or sorted(depth_probes) != [(1, 1), (1, 2), (2, 1)]:
        raise ConfigError(
            f"expected 3 head probes and depth probes (1, 1), (2, 1), (1, 2), got {head_probes}, {depth_probes}"
        )
    model_graphs = [g for g in graphs if g in MODEL_GRAPHS]
    per_graph: dict[str, GraphFlops] = {}
    with tempfile.TemporaryDirectory(prefix="clusca-hv-flops-") as tmp:
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
            if g not in MODEL_GRAPHS:  # k-means and selection: no weights, exported at the real size
                log.info("counting FLOPs of the %s graph", g)
                per_graph[g] = count_file(export_graph(None, spec, g, Path(tmp) / f"{g}.onnx"), g)
    return VideoFlops(spec, per_graph, tuple(head_probes), tuple(depth_probes))
