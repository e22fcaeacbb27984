"""ClusCa's k-means alone, at the graph level: time per call of the cluster graph on each CPU backend,
for several ways of computing it, and how far each moves the clusters from the reference.

    .venv/bin/python benchmarks/kmeans.py --json benchmarks/results/kmeans.json        # B/2 and FLUX widths
    .venv/bin/python benchmarks/kmeans.py --shapes b2 --repeats 3 --backends onnxruntime  # a quick look

Variants (``VARIANTS``): the distance (``l1`` by one centroid at a time, by one broadcast
[B, T, K, D] difference, by chunks of centroids; squared ``l2`` by one MatMul) and the Lloyd
iterations per call (10: the reference; fewer: a warm start from the previous cycle's centroids
needs fewer). Each variant is exported as its own cluster graph (``ops.kmeans`` with the distance
swapped in; static shapes, the iterations unrolled) and run by ONNX Runtime and OpenVINO (fp32, as
the engines run clustering) with ``--threads`` threads; every round runs every (variant, backend)
once in a rotated order, times are medians.

Agreement: on the hidden states of a real model (the trained ``dit-digits``, a ClusCa run of
``--steps`` steps, N=5: the hidden states of its first two clustering full steps, both guidance
halves), each variant clusters the first cold (from the same random tokens) and the second warm
(from its own first centroids), as the engines do; the adjusted Rand index of its assignment
against the reference's (10 iterations, L1) says how much it moved (1.0: the same partition).
Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt import ops  # noqa: E402
from clusca_trt.analysis.bench import device_name  # noqa: E402
from clusca_trt.engines.manifest import library_versions  # noqa: E402

log = logging.getLogger("kmeans")

SHAPES = {  # B (graph batch: one sample with guidance), T tokens, D width, K clusters
    "b2": (2, 256, 768, 16),  # DiT-B/2 at 256 px
    "xl2": (2, 256, 1152, 16),  # DiT-XL/2 at 256 px
    "flux": (2, 4096, 3072, 16),  # FLUX.1-dev at 1024 x 1024
}


def l1_loop(x, c):
    return torch.stack([(x - c[:, j : j + 1]).abs().sum(-1) for j in range(c.shape[1])], dim=-1)


def l1_broadcast(x, c):
    return (x.unsqueeze(2) - c.unsqueeze(1)).abs().sum(-1)


def l1_chunks(x, c, size=4):
    parts = [(x.unsqueeze(2) - c[:, j : j + size].unsqueeze(1)).abs().sum(-1) for j in range(0, c.shape[1], size)]
    return torch.cat(parts, dim=-1)


_PAIRWISE = ops.pairwise_distance


def l2_matmul(x, c):
    return _PAIRWISE(x, c, "l2")


DISTANCES = {"l1-loop": l1_loop, "l1-broadcast": l1_broadcast, "l1-chunks4": l1_chunks, "l2-matmul": l2_matmul}
REFERENCE = "l1-loop-10 (reference)"
VARIANTS = {  # name: (distance, Lloyd iterations per call)
    "l1-loop-10 (reference)": ("l1-loop", 10),
    "l1-broadcast-10": ("l1-broadcast", 10),
    "l1-chunks4-10": ("l1-chunks4", 10),
    "l1-loop-3": ("l1-loop", 3),
    "l2-matmul-10": ("l2-matmul", 10),
    "l2-matmul-3": ("l2-matmul", 3),
}


def kmeans_with(distance: str, iterations: int):
    """``ops.kmeans`` with the distance computed by ``DISTANCES[distance]``."""
    fn = DISTANCES[distance]

    def run(x, centroids, init, warm):
        ops.pairwise_distance = lambda a, b, metric: fn(a, b)
        try:
            return ops.kmeans(x, centroids, init, warm, iterations, "l1")
        finally:
            ops.pairwise_distance = _PAIRWISE

    return run


class KMeans(torch.nn.Module):
    def __init__(self, distance: str, iterations: int):
        super().__init__()
        self.fn = kmeans_with(distance, iterations)

    def forward(self, x, centroids, init, warm):
        return self.fn(x, centroids, init, warm)


def example(shape, seed=0):
    b, t, d, k = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, d, generator=g), torch.randn(b, k, d, generator=g),
            torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)]), torch.ones(1))


def export(variant: str, shape, folder: Path) -> Path:
    distance, iterations = VARIANTS[variant]
    path = folder / f"{distance}-{iterations}-{'x'.join(map(str, shape))}.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad():
        torch.onnx.export(KMeans(distance, iterations), example(shape), dynamo=True, opset_version=20,
                          input_names=["x", "centroids", "init", "warm"],
                          output_names=["assign", "centroids_out", "dist"]).save(str(path))
    return path


def runner(path: Path, backend: str, threads: int, feeds: dict):
    if backend == "openvino":
        import openvino as ov

        from clusca_trt.engines.openvino import DEVICE, graph_config

        compiled = ov.Core().compile_model(str(path), DEVICE, graph_config("cluster_img", "fp32", threads, None))
        request = compiled.create_infer_request()
        for name, a in feeds.items():
            request.set_tensor(name, ov.Tensor(a, shared_memory=True))
        return request.infer
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def time_variants(shape_name: str, variants: list[str], backends: list[str], threads: int, repeats: int) -> dict:
    shape = SHAPES[shape_name]
    feeds = {n: a.numpy() for n, a in zip(["x", "centroids", "init", "warm"], example(shape))}
    with tempfile.TemporaryDirectory(prefix="clusca-kmeans-") as tmp:
        runs = {}
        for v in variants:
            log.info("%s: exporting %s", shape_name, v)
            path = export(v, shape, Path(tmp))
            for be in backends:
                runs[v, be] = runner(path, be, threads, feeds)
                runs[v, be]()  # the first call allocates
        keys = list(runs)
        times = {k: [] for k in keys}
        for r in range(repeats):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
    return {v: {be: round(statistics.median(times[v, be]) * 1e3, 3) for be in backends} for v in variants}


def agreement(variants: list[str], steps: int, seed: int) -> dict:
    """Adjusted Rand index of each variant's assignments against the reference's, on the hidden
    states of the trained dit-digits model's first two clustering full steps (cold, then warm)."""
    from sklearn.metrics import adjusted_rand_score

    from clusca_trt.models import load_model
    from clusca_trt.runtime.pipeline import Pipeline
    from clusca_trt.spec import BuildOptions

    model = load_model("dit-digits")
    spec = model.adapter.export_spec(BuildOptions(batch=1, clusters=16, order=2))
    pipe = Pipeline.from_adapter(model.adapter, spec)
    pipe.engine.device_loop = False
    hidden = []
    run = pipe.engine.run

    def spy(graph, feeds):
        out = run(graph, feeds)
        if graph == "full":
            hidden.append(torch.from_numpy(pipe.engine.read_state("hidden_img")))
        return out

    pipe.engine.run = spy
    pipe.generate([3], seed=seed, steps=steps, method="clusca", interval=5)
    h1, h2 = hidden[1], hidden[2]  # after the warm-up full step and the next cycle's full step
    b, t, d = h1.shape
    k = spec.options.clusters
    g = torch.Generator().manual_seed(seed)
    init = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
    zeros = torch.zeros(b, k, d)
    out = {}
    ref = None
    for v in variants:
        distance, iterations = VARIANTS[v]
        fn = kmeans_with(distance, iterations)
        with torch.no_grad():
            a1, c1, _ = fn(h1, zeros, init, torch.zeros(1))
            a2, _, _ = fn(h2, c1, init, torch.ones(1))
        if ref is None:
            ref = (a1, a2)
        out[v] = {
            "cold_ari": round(float(np.mean([adjusted_rand_score(ref[0][i], a1[i]) for i in range(b)])), 4),
            "warm_ari": round(float(np.mean([adjusted_rand_score(ref[1][i], a2[i]) for i in range(b)])), 4),
        }
    # the yardstick: the reference itself from other random tokens (k-means' own spread between starts)
    other = []
    for s in range(1, 4):
        g = torch.Generator().manual_seed(seed + s)
        init2 = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
        fn = kmeans_with(*VARIANTS[REFERENCE])
        with torch.no_grad():
            a1, c1, _ = fn(h1, zeros, init2, torch.zeros(1))
            a2, _, _ = fn(h2, c1, init2, torch.ones(1))
        other.append((np.mean([adjusted_rand_score(ref[0][i], a1[i]) for i in range(b)]),
                      np.mean([adjusted_rand_score(ref[1][i], a2[i]) for i in range(b)])))
    spread = {"cold_ari": round(float(np.mean([o[0] for o in other])), 4),
              "warm_ari": round(float(np.mean([o[1] for o in other])), 4)}
    return {"model": "dit-digits (trained)", "tokens": [b, t, d], "clusters": k, "variants": out,
            "reference_from_other_starts": spread}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="b2,flux", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of the names in VARIANTS")
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="steps of the dit-digits run the agreement is measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="kmeans: %(message)s", stream=sys.stderr)
    variants = [REFERENCE] + [v for v in VARIANTS if v in args.variants.split(",") and v != REFERENCE]
    backends = args.backends.split(",")
    result = {"command": " ".join(["python"] + sys.argv), "device": device_name(), "threads": args.threads,
              "versions": library_versions(), "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "ms_per_call": {}, "agreement": agreement(variants, args.steps, args.seed)}
    for shape in args.shapes.split(","):
        result["ms_per_call"][shape] = {"shape_btdk": list(SHAPES[shape]),
                                        **time_variants(shape, variants, backends, args.threads, args.repeats)}
    print(f"k-means per call, ms (median of {args.repeats} interleaved rounds), {result['device']}, "
          f"{args.threads} threads")
    agree = result["agreement"]["variants"]
    for shape, rows in result["ms_per_call"].items():
        print(f"\n{shape} (B, T, D, K = {rows['shape_btdk']})")
        print(f"  {'variant':<26}" + "".join(f"{be:>14}" for be in backends) + f"{'ARI cold':>10}{'ARI warm':>10}")
        for v in variants:
            print(f"  {v:<26}" + "".join(f"{rows[v][be]:>14.2f}" for be in backends)
                  + f"{agree[v]['cold_ari']:>10.3f}{agree[v]['warm_ari']:>10.3f}")
    spread = result["agreement"]["reference_from_other_starts"]
    print(f"\nARI of the reference against itself from other random starts (k-means' own spread): cold "
          f"{spread['cold_ari']:.3f}, warm {spread['warm_ari']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
