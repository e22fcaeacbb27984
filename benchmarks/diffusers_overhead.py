"""What ``clusca_trt.enable`` adds to a step: a DiT-B/2-size ``DiTPipeline`` (random weights) with
method ``full`` (every step the plain graph of our step modules), timed inside the pipeline.

Per pipeline call, ``Enabled.last_call`` has the wall time of the served transformer calls through
the hook (``seconds``) and, of that, the first step's setup (``start_seconds``: the plan, its
draws, the conditioning ahead; the step modules are made in the warm-up call) and the engine's
graph calls (``graph_seconds``, the driver's timings of ``engine.run``: the graphs
``Pipeline.generate`` runs). The rest (``wrapper_seconds``) is what the wrapper adds to the steps:
binding the forward's arguments, reading the call, checking the conditioning computed ahead,
moving rows to and from the host, wrapping the output (and the driver's ``np.isfinite`` over
``out``). The target: <= 1% of a full step.

For context it also times whole pipeline calls: untouched (diffusers' own DiT forward), enabled
with method full, enabled with ClusCa (N, K as given). The VAE is a tiny one (its decode is in
every call alike); the DDIM scheduler is configured as DiT samples.

    .venv/bin/python benchmarks/diffusers_overhead.py                       # DiT-B/2 size, 20 steps, 3 rounds
    .venv/bin/python benchmarks/diffusers_overhead.py --size tiny --steps 6 --repeats 1   # a quick check
    .venv/bin/python benchmarks/diffusers_overhead.py --device cuda --dtype bf16          # on a GPU

Not a test: nothing here asserts a timing. Writes ``diffusers_overhead.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clusca_trt  # noqa: E402
from clusca_trt.analysis.bench import device_name  # noqa: E402
from clusca_trt.engines.manifest import library_versions  # noqa: E402
from peers import SIZES, dit_pipeline, random_diffusers_dit  # noqa: E402  (benchmarks/: the script's folder)

log = logging.getLogger("diffusers_overhead")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_pipeline(size: str, seed: int, device: str, dtype: torch.dtype):
    """peers.py's pipeline over peers.py's random DiT (``SIZES``: b2 is DiT-B/2 at 256 px, 256 tokens)."""
    pipe = dit_pipeline(random_diffusers_dit(size, seed))
    if device != "cpu" or dtype != torch.float32:
        pipe = pipe.to(device, dtype)
    return pipe


def call(pipe, args) -> float:
    t0 = time.perf_counter()
    pipe(class_labels=[207] * args.batch, generator=torch.Generator().manual_seed(0),
         num_inference_steps=args.steps, output_type="pt")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="b2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="samples per call (DiTPipeline runs 2x rows with guidance)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="diffusers_overhead: %(message)s", stream=sys.stderr)
    for noisy in ("clusca_trt", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = make_pipeline(args.size, 0, args.device, DTYPES[args.dtype])
    rows = {"untouched": [], "full": [], "clusca": []}
    wrapper = []  # per call of method full: (wrapper seconds, graph seconds, served steps)
    settings = {"full": dict(method="full"), "clusca": dict(interval=args.interval, clusters=args.clusters)}
    for name in rows:  # each enabled once: a warm-up call (step modules made), then the measured calls
        handle = clusca_trt.enable(pipe, **settings[name]) if name in settings else None
        try:
            for r in range(args.repeats + 1):
                seconds = call(pipe, args)
                if r == 0:
                    continue
                rows[name].append(seconds)
                if name == "full":
                    c = handle.last_call
                    wrapper.append((c.wrapper_seconds, c.graph_seconds, c.served))
                log.info("%-9s call %d: %.3f s", name, r, seconds)
        finally:
            if handle:
                clusca_trt.disable(pipe)

    per_step = [w / n for w, _, n in wrapper]
    overhead = [w / g for w, g, _ in wrapper]
    summary = {
        "command": " ".join(["python"] + sys.argv),
        "device": device_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": device_name(),
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "pipeline_seconds": {k: statistics.median(v) for k, v in rows.items()},
        "full_step_graph_ms": 1e3 * statistics.median(g / n for _, g, n in wrapper),  # cond graph in step 0
        "wrapper_us_per_step": 1e6 * statistics.median(per_step),
        "wrapper_overhead_of_a_full_step": statistics.median(overhead),
        "rounds": {"wrapper": wrapper, **rows},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "diffusers_overhead" + ("" if args.size == "b2" else f"-{args.size}")
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    print(f"DiT {args.size} in a DiTPipeline, {args.steps} steps, batch {args.batch} (x2 rows, guidance), "
          f"{args.device} {args.dtype} on {summary['device']} (CPU: {summary['cpu']}, {summary['torch_threads']} threads)")
    print(f"  full step in the engine's graphs: {summary['full_step_graph_ms']:.2f} ms; the wrapper adds "
          f"{summary['wrapper_us_per_step']:.0f} us per step = {100 * summary['wrapper_overhead_of_a_full_step']:.3f}% "
          f"(target <= 1%)")
    for k, v in summary["pipeline_seconds"].items():
        print(f"  pipeline call, {k:9s}: {v:.3f} s (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
