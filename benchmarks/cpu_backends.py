"""The CPU backends side by side on one build: ONNX Runtime fp32, OpenVINO fp32 and, where the CPU
has bf16 units, OpenVINO bf16. Which one should be the default on this CPU, by measurement.

    .venv/bin/python benchmarks/cpu_backends.py --json benchmarks/results/cpu-backends.json   # DiT-B/2 size
    .venv/bin/python benchmarks/cpu_backends.py --model dit-digits --repeats 7                 # the demo model
    .venv/bin/python benchmarks/cpu_backends.py --model dit-tiny --steps 10 --repeats 1         # a smoke run

Builds (or reuses, in ``--work``) the engines of ``--model`` (default ``dit-b-2`` with random
weights: 256 tokens, one sample with guidance, K=16, O=2), opens them once per backend
configuration and runs, in every round and in an order rotated per round: full compute and ClusCa
(N=5, K=16, O=2, gamma=0.005, W=2) on every configuration, ``--steps`` DDIM steps, ``--threads``
threads. Reports, per configuration: the median run of each method, each graph's median call,
ClusCa's overhead (clustering + selection calls) as a share of its run; the ratios the issue asks
for (OpenVINO full vs ONNX Runtime full; OpenVINO ClusCa vs ONNX Runtime ClusCa and vs OpenVINO
full); and accuracy against ONNX Runtime fp32: PSNR of the final latents (full and ClusCa) and the
share of tokens whose last clustering put them in another cluster. Not a test: nothing asserts a
timing. The machine's other load hits every configuration alike (interleaved rounds), but a busy
machine still makes the ratios noisy: say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.analysis.bench import device_name  # noqa: E402
from clusca_trt.analysis.flops import graph_kind  # noqa: E402
from clusca_trt.engines.manifest import library_versions  # noqa: E402
from clusca_trt.engines.openvino import cpu_capabilities  # noqa: E402
from clusca_trt.exporters.build import build_engines  # noqa: E402
from clusca_trt.models import load_model  # noqa: E402
from clusca_trt.runtime.metrics import latent_psnr  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.spec import BuildOptions  # noqa: E402

log = logging.getLogger("cpu_backends")

METHODS = {"full": {}, "clusca": {"interval": 5, "propagation": 0.005, "warmup": 2}}


def configurations(requested: str | None) -> list[tuple[str, str]]:
    """(backend, precision) pairs: ONNX Runtime fp32, OpenVINO fp32, OpenVINO bf16 where the CPU has bf16 units."""
    if requested:
        return [tuple(c.split(":")) for c in requested.split(",")]
    out = [("onnxruntime", "fp32"), ("openvino", "fp32")]
    if "BF16" in cpu_capabilities():
        out.append(("openvino", "bf16"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit-b-2", help="dit-b-2 / dit-s-2 / dit-tiny (random weights) or dit-digits")
    p.add_argument("--configs", default=None, help="backend:precision,... [default: onnxruntime:fp32, openvino:fp32, "
                                                   "openvino:bf16 where the CPU has bf16 units]")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "cpu-backends")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cpu_backends: %(message)s", stream=sys.stderr)
    for noisy in ("clusca_trt", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    random_init = args.model != "dit-digits"
    loaded = load_model(args.model, random_init=random_init, seed=0)
    manifest = build_engines(loaded, BuildOptions(batch=1, clusters=16, order=2), args.work / args.model).manifest
    configs = configurations(args.configs)
    pipes = {c: Pipeline.load(manifest.directory, backend=c[0], precision=c[1], threads=args.threads, verify=False)
             for c in configs}
    kw = dict(seed=args.seed, steps=args.steps)
    for (c, pipe) in pipes.items():
        for m, settings in METHODS.items():
            pipe.generate([args.label], **dict(kw, steps=min(8, args.steps)), method=m, **settings)
    runs = defaultdict(list)
    calls = defaultdict(list)
    latents, assign = {}, {}
    share = defaultdict(list)
    keys = [(c, m) for c in configs for m in METHODS]
    for r in range(args.repeats):
        for c, m in keys[r % len(keys):] + keys[: r % len(keys)]:
            pipe = pipes[c]
            out = pipe.generate([args.label], **kw, method=m, **METHODS[m])
            runs[c, m].append(out.seconds)
            for g, ts in out.timings.items():
                calls[c, m, g].extend(ts)
            if m == "clusca":  # clustering + selection calls, as a share of the run
                share[c].append(sum(sum(ts) for g, ts in out.timings.items()
                                    if graph_kind(g) in ("cluster", "select")) / out.seconds)
            if (c, m) not in latents:
                latents[c, m] = out.latents
                if m == "clusca":
                    assign[c] = pipe.engine.read_state("assign_img")
            log.info("round %d/%d: %s %s %-7s %8.2f s", r + 1, args.repeats, *c, m, out.seconds)
    ref = configs[0]
    result = {"command": " ".join(["python"] + sys.argv), "device": device_name(), "threads": args.threads,
              "versions": library_versions(), "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "openvino_capabilities": list(cpu_capabilities()), "model": args.model, "steps": args.steps,
              "repeats": args.repeats, "configs": {}}
    for c in configs:
        name = f"{c[0]} {c[1]}"
        per_graph = {}
        for (cc, m, g), ts in calls.items():
            if cc == c:
                per_graph.setdefault(g, []).extend(ts)
        result["configs"][name] = {
            "engine": str(pipes[c].engine.info),
            "run_s": {m: statistics.median(runs[c, m]) for m in METHODS},
            "ms_per_call": {g: round(statistics.median(ts) * 1e3, 3) for g, ts in sorted(per_graph.items())},
            "clusca_vs_full": statistics.median(f / s for f, s in zip(runs[c, "full"], runs[c, "clusca"])),
            "clustering_selection_share": statistics.median(share[c]),
            "psnr_vs_reference": {m: latent_psnr(latents[c, m], latents[ref, m]) for m in METHODS} if c != ref else None,
            "tokens_in_another_cluster": float(np.mean(assign[c] != assign[ref])) if c != ref else None,
        }
    base = result["configs"][f"{ref[0]} {ref[1]}"]["run_s"]
    for name, r in result["configs"].items():
        r["full_vs_reference_full"] = base["full"] / r["run_s"]["full"]
        r["clusca_vs_reference_clusca"] = base["clusca"] / r["run_s"]["clusca"]
    for pipe in pipes.values():
        pipe.close()

    print(f"{args.model}, {args.steps} DDIM steps, one sample with guidance, ClusCa N=5 K=16 O=2; {result['device']}, "
          f"{args.threads} threads; OpenVINO capabilities {', '.join(result['openvino_capabilities'])}; medians of "
          f"{args.repeats} interleaved rounds; reference: {ref[0]} {ref[1]}")
    print(f"{'backend':<18}{'full s':>9}{'ClusCa s':>10}{'ClusCa x':>10}{'full vs ref':>12}{'ClusCa vs ref':>14}"
          f"{'k-means+sel':>12}{'PSNR full':>10}{'PSNR ClusCa':>12}{'flips':>8}")
    for name, r in result["configs"].items():
        ps = r["psnr_vs_reference"] or {}
        flips = r["tokens_in_another_cluster"]
        print(f"{name:<18}{r['run_s']['full']:>9.2f}{r['run_s']['clusca']:>10.2f}{r['clusca_vs_full']:>10.2f}"
              f"{r['full_vs_reference_full']:>12.2f}{r['clusca_vs_reference_clusca']:>14.2f}"
              f"{100 * r['clustering_selection_share']:>11.1f}%"
              f"{ps.get('full', float('nan')):>10.1f}{ps.get('clusca', float('nan')):>12.1f}"
              f"{'' if flips is None else f'{100 * flips:.2f}%':>8}")
    graphs = sorted({g for r in result["configs"].values() for g in r["ms_per_call"]})
    print("median ms per call: " + "; ".join(
        f"{g}: " + ", ".join(f"{name} {r['ms_per_call'].get(g, float('nan')):.2f}" for name, r in result["configs"].items())
        for g in graphs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
