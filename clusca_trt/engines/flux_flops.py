"""FLOPs of FLUX's real configurations (FLUX.1-dev: 24 heads x 128, 19 double- and 38 single-stream
blocks; at 1024 x 1024, 4096 image + 512 text tokens) from the ONNX counter (``engines.flops``)
without exporting a 12B-parameter model, and an analytic count of its matrix products to check
the counter against.

The model graphs are exported at the real token counts and head width (128) with 1, 2 and 3 heads
and (1, 1), (2, 1), (1, 2) blocks, counted, and carried to the real size exactly by the rules of
``engines.hunyuan_flops`` (the same dual/single-stream layout): every count is affine in each
block count and a polynomial of degree <= 2 in the head count. The probes have random weights:
with equal (e.g. all-zero) weights the exporter merges identical initializers and then identical
projections (q, k, v of one input), and the count comes out low. The k-means and selection
graphs have no weights and are exported at the real size directly.

``analytic_matmul_flops`` counts one step's matrix products per sample, 2 FLOPs per multiply-add
(T_i, T_t image and text tokens, T = T_i + T_t, D hidden, F = 4D the MLP hidden size):

* every step: x_embedder 2 T_i C_in D; context_embedder 2 T_t J D; timestep (and guidance)
  embedding 2 (256 D + D^2) each; pooled-text embedding 2 (P D + D^2); modulation 2 D 6D twice
  per double block, 2 D 3D per single block, 2 D 2D for the final norm; proj_out 2 T_i D C_out;
  the linears of that conditioning path take [B, D] rows and are exported as ``Gemm``, whose bias
  add the counter puts in the matmul category: one FLOP per output of each;
* full step, per double block: q, k, v, out of both streams 8 T D^2; joint attention 2 x 2 T^2 D
  (Q K^T and A V over all heads); the two MLPs 2 x 2 T D F; per single block: q, k, v 6 T D^2,
  proj_mlp 2 T D F, proj_out 2 T (D + F) D, attention 4 T^2 D;
* partial step, per double block: the two MLPs on their fresh rows only, 4 (K_img + K_txt) D F;
  no attention anywhere and nothing but modulation in a single block (its output is forecast).

Element-wise work (norms, rotary embeddings, gates, the Taylor forecast and propagation) is in the
counter's totals only. The forecast's sum over the Taylor orders is a MatMul over the orders in
the graphs (``ops.taylor_forecast_layers``), so with O >= 1 the counter's matmul category holds
that too; at O = 0 the two agree exactly (a test checks it).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..models import flux
from ..spec import BuildOptions
from .flops import GraphFlops, count_file
from .hunyuan_flops import at_depth, at_heads

log = logging.getLogger(__name__)

MODEL_GRAPHS = ("full", "partial", "forecast")
HEAD_PROBES = (1, 2, 3)
DEPTH_PROBES = ((1, 1), (2, 1), (1, 2))


def probe_adapter(cfg: flux.FluxConfig, heads: int, double: int, single: int, seed: int = 0) -> flux.FluxAdapter:
    """``cfg`` with ``heads`` heads and the given block counts, random weights (diffusers' initialisation)."""
    small = cfg.replace(num_attention_heads=heads, num_layers=double, num_single_layers=single)
    return flux.FluxAdapter(flux.init_random(small, seed), small)


def flux_flops(
    options: BuildOptions, cfg: flux.FluxConfig | None = None, graphs: tuple[str, ...] | None = None
) -> dict[str, GraphFlops]:
    """FLOPs of every graph of a build of ``cfg`` (default: FLUX.1-dev at 1024 x 1024), by graph name.

    ``graphs``: the graphs to count (default: full, partial and every cluster/select graph: what a
    ClusCa schedule calls; add ``forecast`` for TaylorSeer/FORA)."""
    from ..exporters import export_graph

    cfg = cfg or flux.NAMED_CONFIGS["flux-dev"]
    spec = flux.export_spec(cfg, options)
    graphs = graphs or tuple(n for n in spec.graphs if n != "forecast")
    model_graphs = [g for g in graphs if g in MODEL_GRAPHS]
    out: dict[str, GraphFlops] = {}
    with tempfile.TemporaryDirectory(prefix="clusca-flux-flops-") as tmp:
        by_heads: dict[str, dict[int, GraphFlops]] = {g: {} for g in model_graphs}
        for h in HEAD_PROBES:
            by_depth: dict[str, dict[tuple[int, int], GraphFlops]] = {g: {} for g in model_graphs}
            for d, s in DEPTH_PROBES:
                adapter = probe_adapter(cfg, h, d, s)
                probe_spec = adapter.export_spec(options)
                for g in model_graphs:
                    log.info("counting FLOPs of the %s graph at %d heads, %d + %d blocks", g, h, d, s)
                    path = export_graph(adapter, probe_spec, g, Path(tmp) / f"{g}-{h}-{d}-{s}.onnx")
                    by_depth[g][d, s] = count_file(path, g)
            for g in model_graphs:
                by_heads[g][h] = at_depth(by_depth[g], cfg.num_layers, cfg.num_single_layers)
        for g in model_graphs:
            out[g] = at_heads(by_heads[g], cfg.num_attention_heads)
        for g in graphs:
            if g not in MODEL_GRAPHS:  # k-means and selection: no weights, exported at the real size
                log.info("counting FLOPs of the %s graph", g)
                out[g] = count_file(export_graph(None, spec, g, Path(tmp) / f"{g}.onnx"), g)
    return out


def analytic_matmul_flops(cfg: flux.FluxConfig, k_img: int, k_txt: int) -> dict[str, int]:
    """Matrix-product FLOPs of one full, partial and forecast step per sample (module docstring)."""
    ti, tt = cfg.image_tokens, cfg.text_length
    t, d = ti + tt, cfg.hidden_size
    f = 4 * d
    l2, l1 = cfg.num_layers, cfg.num_single_layers
    embeddings = 2 * (256 * d + d * d) * (2 if cfg.guidance_embeds else 1) + 2 * (cfg.pooled_projection_dim * d + d * d)
    gemm_bias = 2 * d * (2 if cfg.guidance_embeds else 1) + 2 * d + l2 * 2 * 6 * d + l1 * 3 * d + 2 * d
    every = (
        gemm_bias
        + 2 * ti * cfg.in_channels * d
        + 2 * tt * cfg.joint_attention_dim * d
        + embeddings
        + l2 * 2 * (2 * d * 6 * d)
        + l1 * 2 * d * 3 * d
        + 2 * d * 2 * d
        + 2 * ti * d * cfg.out_channels
    )
    double_full = 8 * t * d * d + 4 * t * t * d + 4 * t * d * f
    single_full = 6 * t * d * d + 2 * t * d * f + 2 * t * (d + f) * d + 4 * t * t * d
    return {
        "full": every + l2 * double_full + l1 * single_full,
        "partial": every + l2 * 4 * (k_img + k_txt) * d * f,
        "forecast": every,
    }
