"""FLUX at its real width: a few FLUX.1-dev blocks (3072 wide, 24 heads of 128) at 1024 x 1024
(4096 image + 512 text tokens), random weights, built into engines and sampled on one backend:
full compute vs ClusCa (N=6, K=16, O=1) vs TaylorSeer (N=6, O=1): wall time, speed-up, FLOPs
speed-up, efficiency, memory, and each method's PSNR against full compute.

    .venv/bin/python benchmarks/flux_width.py --json benchmarks/results/flux-width.json   # the README row
    .venv/bin/python benchmarks/flux_width.py --height 256 --width 256 --text-length 64 --steps 8 --repeats 1
                                                                                       # a smoke run

Default: 1 double-stream + 2 single-stream blocks of FLUX.1-dev's size (FLUX.1-dev has 19 + 38),
one prompt (random T5 / CLIP embeddings, seed 0), 50 flow-matching steps with the model's
distilled guidance 3.5, W=3, gamma=0.005; the OpenVINO backend in its default precision (bf16
where the CPU has bf16 units, else fp32), ``--threads`` threads. Memory: every graph file holds
the fp32 weights it uses (plain and full: all blocks but their modulation; partial: the
double-stream blocks' MLPs; cond: the modulation), the export holds the model besides, and the
compiled engines hold the weights again: 1 + 1 blocks peaked at 9.1 GB of RSS (build and sampling
in one process, 256 x 256); each double-stream block adds about 2.5 GB, each single-stream block
about 1 GB. Keep the block counts small on a small machine. Time: a full step of 1 + 2 blocks at
4608 tokens is about 5 TFLOP: some 100 s on 2 cores in fp32 without bf16 units (there, pass fewer
``--steps``), a few seconds with AMX.

Timing: one warm-up run of every method (``--warmup-steps`` steps), then ``--repeats`` rounds of
every method in an order rotated per round; times are medians. The engines are built once into
``--work`` and reused. Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.analysis.bench import device_name, peak_rss_mib  # noqa: E402
from clusca_trt.analysis.flops import count_engine_dir, flops_speedup  # noqa: E402
from clusca_trt.engines.manifest import library_versions  # noqa: E402
from clusca_trt.exporters.build import build_engines  # noqa: E402
from clusca_trt.models import LoadedModel  # noqa: E402
from clusca_trt.models import flux  # noqa: E402
from clusca_trt.runtime.metrics import latent_psnr  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.spec import BuildOptions  # noqa: E402

log = logging.getLogger("flux_width")

METHODS = {  # method: generate settings (the build's defaults fill the rest: W=3, gamma=0.005)
    "full": {},
    "clusca": {"interval": 6, "order": 1},
    "taylorseer": {"interval": 6, "order": 1},
}


def loaded_model(args) -> LoadedModel:
    """FLUX.1-dev's per-block size with ``args.double`` / ``args.single`` blocks, random weights."""
    cfg = flux.NAMED_CONFIGS["flux-dev"].replace(num_layers=args.double, num_single_layers=args.single,
                                                 height=args.height, width=args.width, text_length=args.text_length)
    log.warning("FLUX.1-dev-size blocks (%d double, %d single) with RANDOM weights (seed %d)", args.double,
                args.single, args.seed)
    model = flux.init_random(cfg, args.seed)
    options = {"height": cfg.height, "width": cfg.width, "text_length": cfg.text_length}
    return LoadedModel(f"flux-dev-width-{args.double}d{args.single}s", flux.FAMILY, flux.FluxAdapter(model, cfg),
                       cfg.to_dict(), {"kind": "random-init", "seed": args.seed}, options=options,
                       build_name=f"{cfg.height}x{cfg.width}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-length", type=int, default=512)
    p.add_argument("--clusters", "-K", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--backend", choices=["openvino", "onnxruntime"], default="openvino")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="openvino [default: bf16 where the "
                                                                              "CPU has bf16 units, else fp32]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "flux-width", help="engines (reused)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="flux_width: %(message)s", stream=sys.stderr)
    for noisy in ("clusca_trt", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    loaded = loaded_model(args)
    t0 = time.perf_counter()
    manifest = build_engines(loaded, BuildOptions(batch=1, clusters=args.clusters, order=1),
                             args.work / loaded.name).manifest
    build_s = time.perf_counter() - t0
    del loaded  # the engines hold what they need
    per_graph = {n: g.total for n, g in count_engine_dir(manifest).items()}
    log.info("built %s in %.0f s; loading on %s", manifest.directory, build_s, args.backend)
    pipe = Pipeline.load(manifest.directory, backend=args.backend, precision=args.precision, threads=args.threads,
                         verify=False)
    cfg = pipe.model["config"]
    rng = np.random.default_rng(args.seed)
    inputs = dict(prompt_embeds=rng.standard_normal((1, args.text_length, cfg["joint_attention_dim"]), np.float32),
                  pooled_prompt_embeds=rng.standard_normal((1, cfg["pooled_projection_dim"]), np.float32),
                  seed=args.seed)
    for m, kw in METHODS.items():
        log.info("warm-up: %s", m)
        pipe.generate(**inputs, steps=args.warmup_steps, method=m, **kw)
    runs = {m: [] for m in METHODS}
    latents = {}
    methods = list(METHODS)
    for r in range(args.repeats):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            out = pipe.generate(**inputs, steps=args.steps, method=m, **METHODS[m])
            runs[m].append(out)
            latents.setdefault(m, out.latents)
            log.info("round %d/%d: %-11s %8.2f s", r + 1, args.repeats, m, out.seconds)
    full_s = [o.seconds for o in runs["full"]]
    rows = {}
    for m in methods:
        seconds = [o.seconds for o in runs[m]]
        config = runs[m][0].config
        speedup = float(statistics.median(f / s for f, s in zip(full_s, seconds)))
        fx = flops_speedup(per_graph, pipe.spec, config, args.steps)
        timings = {}
        for o in runs[m]:
            for g, ts in o.timings.items():
                timings.setdefault(g, []).extend(ts)
        rows[m] = {
            "config": {"interval": config.interval, "clusters": config.clusters, "order": config.order,
                       "warmup": config.warmup, "propagation": config.propagation},
            "seconds": statistics.median(seconds), "runs": seconds, "wall_speedup": speedup,
            "flops_speedup": fx, "efficiency": speedup / fx, "step_counts": runs[m][0].step_counts,
            "psnr_vs_full": latent_psnr(latents[m], latents["full"]) if m != "full" else None,
            "ms_per_call": {g: round(statistics.median(ts) * 1e3, 2) for g, ts in timings.items()},
        }
    result = {
        "command": " ".join(["python"] + sys.argv), "device": device_name(pipe.engine.info),
        "engine": pipe.engine.info.to_dict(), "threads": args.threads, "versions": library_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": {"double_blocks": args.double, "single_blocks": args.single, "width": cfg["num_attention_heads"]
                  * cfg["attention_head_dim"], "heads": cfg["num_attention_heads"],
                  "image_tokens": pipe.spec.groups[0].tokens, "text_tokens": args.text_length, "weights": "random"},
        "steps": args.steps, "repeats": args.repeats, "build_seconds": round(build_s, 1),
        "gflops_per_call": {g: round(v / 1e9, 2) for g, v in per_graph.items()},
        "memory": {"peak_rss_mib": round(peak_rss_mib(), 1), "engine_state_mib": round(pipe.engine.state_bytes() / 2**20, 1),
                   "engine_mib": {k: round(v / 2**20, 1) for k, v in pipe.engine.memory().items()}},
        "methods": rows,
    }
    pipe.close()
    m = result["model"]
    print(f"FLUX.1-dev-size blocks: {m['double_blocks']} double + {m['single_blocks']} single, width {m['width']}, "
          f"{m['heads']} heads, {m['image_tokens']} image + {m['text_tokens']} text tokens, random weights; "
          f"{args.steps} steps, {args.repeats} rounds (medians)")
    print(f"{result['device']}, {pipe.engine.info}, {args.threads or 'default'} threads")
    print(f"{'method':<11}{'N':>3}{'K':>4}{'O':>3}{'run s':>10}{'wall x':>8}{'FLOPs x':>9}{'effic.':>8}{'PSNR dB':>9}")
    for name, r in rows.items():
        c = r["config"]
        ps = "" if r["psnr_vs_full"] is None else f"{r['psnr_vs_full']:.1f}"
        print(f"{name:<11}{c['interval']:>3}{c['clusters']:>4}{c['order']:>3}{r['seconds']:>10.2f}"
              f"{r['wall_speedup']:>8.2f}{r['flops_speedup']:>9.2f}{r['efficiency']:>8.2f}{ps:>9}")
    print("median ms per call: " + " | ".join(f"{g} {v}" for g, v in rows["clusca"]["ms_per_call"].items()))
    mem = result["memory"]
    print(f"memory: peak RSS {mem['peak_rss_mib']} MiB (process, build included), engine state {mem['engine_state_mib']} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
