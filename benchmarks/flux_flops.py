"""FLOPs per step kind of FLUX.1-dev (default 1024 x 1024: 4096 image + 512 text tokens) and the
FLOPs speed-up of ClusCa over the full model for a sampling schedule (default: the paper's
configuration, 50 steps, N=6, K=16, O=1, W=3, gamma=0.005; Table 1 reports 4.96x).

    python benchmarks/flux_flops.py [--height 1024 --width 1024 --steps 50 --interval 6 --clusters 16 --json out.json]

The counts come from the analytic ONNX counter (``clusca_trt.analysis.flops``) over graphs exported
with 1-3 heads and 1-2 blocks of each kind at the real token counts, carried exactly to the real
size (``clusca_trt.analysis.flops.flux_flops``); the full graph's matrix products are checked against a
hand count. A FULL step is the full graph (plus the k-means graphs when partial steps follow it);
a PARTIAL step is the fresh-token selection graphs plus the partial graph. The host-side Euler
update and the text encoders / VAE (run once per image) are left out. Takes a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from clusca_trt.config import ClusCaConfig
from clusca_trt.analysis.flops import flops_speedup, schedule_flops
from clusca_trt.analysis.flops import flux_flops
from clusca_trt.models.flux import analytic_matmul_flops
from clusca_trt.models import flux
from clusca_trt.schedule import plan
from clusca_trt.spec import BuildOptions

PAPER_SPEEDUP = 4.96  # ClusCa paper, Table 1: FLUX.1-dev, 50 steps, N=6, K=16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["flux-dev", "flux-schnell"], default="flux-dev")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--interval", type=int, default=6)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--text-clusters", type=int, default=None, help="default: --clusters")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    cfg = flux.NAMED_CONFIGS[args.model].replace(height=args.height, width=args.width)
    options = BuildOptions(batch=1, clusters=args.clusters, text_clusters=args.text_clusters, order=args.order)
    spec = flux.export_spec(cfg, options)
    config = ClusCaConfig(interval=args.interval, clusters=args.clusters, propagation=0.005, order=args.order,
                          warmup=args.warmup)
    t0 = time.perf_counter()
    counts = flux_flops(options, cfg)
    seconds = time.perf_counter() - t0
    per_graph = {g: c.total for g, c in counts.items()}

    k_txt = spec.group("txt").clusters
    hand = analytic_matmul_flops(cfg, args.clusters, k_txt)
    if counts["full"].by_category["matmul"] != hand["full"]:
        print(f"full graph matmul FLOPs: counter {counts['full'].by_category['matmul']}, hand count {hand['full']}",
              file=sys.stderr)
        return 1

    planned = plan(args.steps, config, args.order)
    ours = schedule_flops(per_graph, spec, planned)
    base = schedule_flops(per_graph, spec, plan(args.steps, config.replace(interval=1, clusters=0), args.order),
                          clustered=False)
    speedup = flops_speedup(per_graph, spec, config, args.steps)
    groups = [g.name for g in spec.clustered_groups]
    full_step = per_graph["full"]
    full_step_clustered = full_step + sum(per_graph[f"cluster_{g}"] for g in groups)
    partial_step = per_graph["partial"] + sum(per_graph[f"select_{g}"] for g in groups)

    T = 1e12
    print(f"{args.model} at {cfg.height} x {cfg.width}: {cfg.image_tokens} image + {cfg.text_length} text tokens, "
          f"{cfg.num_layers} double + {cfg.num_single_layers} single blocks, D={cfg.hidden_size}; "
          f"K_img={args.clusters}, K_txt={k_txt}, O={args.order}  (counted in {seconds:.0f} s)")
    print("FLOPs per graph call (batch 1):")
    for g, c in counts.items():
        print(f"  {g:<12} {c.total / T:12.6f} TFLOPs   (matmul {c.by_category['matmul'] / T:.6f})")
    print(f"  hand count of the matrix products: full {hand['full'] / T:.6f} (equal), "
          f"partial {hand['partial'] / T:.6f} (+ the forecast's order sum, a MatMul in the graph)")
    print("FLOPs per step kind:")
    print(f"  FULL                 {full_step / T:10.4f} TFLOPs")
    print(f"  FULL + k-means       {full_step_clustered / T:10.4f} TFLOPs")
    print(f"  PARTIAL (+ select)   {partial_step / T:10.4f} TFLOPs   "
          f"({full_step / partial_step:.0f}x cheaper than FULL)")
    print(f"schedule: {args.steps} steps, N={args.interval}, W={args.warmup}: "
          f"{ours.calls['full']} full ({ours.calls['cluster'] // max(len(groups), 1)} followed by k-means), "
          f"{ours.calls['partial']} partial")
    print(f"  full model  {base.total / T:10.2f} TFLOPs")
    print(f"  ClusCa      {ours.total / T:10.2f} TFLOPs  "
          + ", ".join(f"{k} {v / T:.2f}" for k, v in ours.by_kind.items() if v))
    print(f"FLOPs speed-up {speedup:.3f}x (paper, Table 1: {PAPER_SPEEDUP}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "model": args.model, "height": cfg.height, "width": cfg.width, "options": vars(args),
                "per_graph": {g: c.to_dict() for g, c in counts.items()},
                "per_step_kind": {"full": full_step, "full_with_kmeans": full_step_clustered, "partial": partial_step},
                "schedule": ours.to_dict(), "full_model": base.to_dict(), "speedup": speedup,
                "paper_speedup": PAPER_SPEEDUP, "hand_matmul": hand,
            }, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
