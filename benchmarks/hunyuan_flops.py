"""FLOPs speed-up of ClusCa on the real HunyuanVideo (480 x 640 x 65 frames, 50 steps), from the
analytic counter, next to the paper's Table 2 (4.99x at N=5, K=32; 6.21x at N=7), and the memory
the module caches take.

    python benchmarks/hunyuan_flops.py                    # N=5 and N=7, K=32, O=1, W=1 (about 10 minutes on 2 cores)
    python benchmarks/hunyuan_flops.py --json out.json    # also the per-graph counts

How (``clusca_trt.analysis.flops``): the full and partial graphs are exported at the real token
counts (20400 video + 256 text) and head width 128 with 1-3 heads and 1-2 blocks of each kind,
counted node by node, and carried exactly to 24 heads, 20 + 40 blocks (affine in the block
counts, quadratic in the head count); the k-means and selection graphs are counted at the real size.
No weights of the real model are needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.config import ClusCaConfig  # noqa: E402
from clusca_trt.analysis.flops import flops_speedup, schedule_flops  # noqa: E402
from clusca_trt.analysis.flops import hunyuan_video_flops  # noqa: E402
from clusca_trt.engines.inspect import spec_cache_bytes  # noqa: E402
from clusca_trt.models import hunyuan_video as hv  # noqa: E402
from clusca_trt.schedule import plan  # noqa: E402
from clusca_trt.spec import BuildOptions  # noqa: E402

PAPER = {5: 4.99, 7: 6.21}  # ClusCa on HunyuanVideo, Table 2 (FLOPs speed-up, K=32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--clusters", type=int, default=32)
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--intervals", default="5,7")
    p.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("torch", "onnxscript", "torch.onnx", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)

    cfg = hv.NAMED_CONFIGS["hunyuan-video"].replace(height=args.height, width=args.width, frames=args.frames)
    options = BuildOptions(clusters=args.clusters, order=args.order)
    t0 = time.perf_counter()
    counts = hunyuan_video_flops(options, cfg)
    per_graph = {n: g.total for n, g in counts.per_graph.items()}
    spec = counts.spec
    cache = spec_cache_bytes(spec)

    print(f"HunyuanVideo {cfg.height}x{cfg.width}x{cfg.frames} frames: {cfg.video_tokens} video + {cfg.text_length} "
          f"text tokens, {cfg.num_layers} dual + {cfg.num_single_layers} single blocks, width {cfg.hidden_size}; "
          f"K={args.clusters}, O={args.order}, batch 1 (counted in {time.perf_counter() - t0:.0f} s)")
    for n, f in per_graph.items():
        print(f"  {n:<12} {f / 1e12:10.3f} TFLOPs per call")
    print(f"  partial / full = {per_graph['partial'] / per_graph['full']:.4f}")
    print(f"module caches: {cache['bytes'] / 2**30:.1f} GiB float32 ({cache['bytes'] / 2 / 2**30:.1f} GiB in 16 bits)")
    rows = {}
    for n in (int(v) for v in args.intervals.split(",")):
        config = ClusCaConfig(interval=n, clusters=args.clusters, propagation=0.01, order=args.order, warmup=1)
        planned = plan(args.steps, config, options.order)
        sched = schedule_flops(per_graph, spec, planned)
        full = schedule_flops(per_graph, spec, plan(args.steps, config.replace(interval=1, clusters=0), options.order),
                              clustered=False)
        speedup = flops_speedup(per_graph, spec, config, args.steps)
        no_kmeans = full.total / (sched.total - sched.by_kind["cluster"] - sched.by_kind["select"])
        rows[n] = {"speedup": speedup, "speedup_without_kmeans_select": no_kmeans, "schedule": sched.to_dict(),
                   "full_schedule_flops": full.total}
        paper = f", paper {PAPER[n]:.2f}x" if n in PAPER else ""
        print(f"N={n}: {sched.calls['full']} full + {sched.calls['partial']} partial steps, "
              f"{sched.total / 1e15:.2f} PFLOPs vs {full.total / 1e15:.2f} PFLOPs for {args.steps} full steps: "
              f"FLOPs speed-up {speedup:.2f}x (without k-means/selection {no_kmeans:.2f}x){paper}")
    if args.json:
        args.json.write_text(json.dumps({
            "config": cfg.to_dict(), "options": options.__dict__,
            "per_graph": {n: g.to_dict() for n, g in counts.per_graph.items()},
            "cache_bytes": cache["bytes"], "schedules": rows,
        }, indent=2, default=str))


if __name__ == "__main__":
    main()
