"""Quality vs speed of full compute, fewer DDIM steps, FORA, TaylorSeer and ClusCa on the
built-in trained model ``dit-digits`` (the paper's Table 3 and Table 4 in miniature).

    python benchmarks/quality.py --samples 200 --threads 2   # the table in the README (33 min here)
    python benchmarks/quality.py                      # 100 samples per row, 1 thread
    python benchmarks/quality.py --samples 500        # tighter FID
    python benchmarks/quality.py --quick              # a handful of rows, 20 samples: a smoke run
    python benchmarks/quality.py --samples 200 --threads 2 --groups update-rules,update-grid
                                                      # only the update rules' rows (quality-update.md)
    python benchmarks/quality.py --samples 200 --distance l2 --only full,clusca --tag l2   # quality-l2.md
    python benchmarks/quality.py --samples 200 --only full,clusca --clusca-grid 3,5,7:4,16:0.005 --tag l1-grid
    python benchmarks/quality.py --samples 200 --backend openvino --precision bf16 --tag ov-bf16

Every row samples the same class labels (0..9 repeated) from the same seed (so the same
initial noise) with 50-step DDIM and classifier-free guidance 1.5, on ONNX Runtime engines
built here (one engine set per K; K is static in the graphs). Columns:

* FLOPs per sample of the whole run and FLOPs speed-up vs 50 full steps: analytic counts of
  the exported ONNX graphs (``clusca_trt.analysis.flops``), per step kind, over the schedule;
* wall speed-up: the sampling time of 50 full steps (measured at the start and at the end of
  the run, averaged) over the row's, same process, same engines batch;
* FID-digits and class accuracy by the shipped digits classifier (``clusca_trt.digits.quality``);
* PSNR / SSIM of each sample against the full-compute sample with the same seed and label.

Row groups (``--groups``, default all): ``main`` (the table; ClusCa with the paper's update rule,
unpaired), ``gamma-sweep``, ``update-rules`` (every update rule and pairing at K=16, N=5 and 8,
gamma 0 and 0.2, TaylorSeer beside) and ``update-grid`` (the family's default update rule over
the main table's N, K and gamma). Writes ``quality.md`` (the tables, notes), ``quality.json`` and
``quality.png`` (FID vs speed-up, one line per method) into ``--out`` (default
``benchmarks/results``); with some groups only, ``quality-<groups>.md`` / ``.json``.
The numbers are whatever they are; nothing here is tuned to any method.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.digits import quality  # noqa: E402
from clusca_trt.config import ClusCaConfig  # noqa: E402
from clusca_trt.analysis import flops as fl  # noqa: E402
from clusca_trt.analysis.bench import device_name  # noqa: E402
from clusca_trt.exporters.build import build_engines  # noqa: E402
from clusca_trt.models import load_model  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.schedule import plan  # noqa: E402
from clusca_trt.spec import BuildOptions  # noqa: E402

MODEL = "dit-digits"
ORDER = 2  # built Taylor order; ClusCa rows use it (the adapter's default), TaylorSeer rows O = 1, 2
WARMUP = 2  # W, the DiT reference's
GAMMA_SWEEP = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
GROUPS = ("main", "gamma-sweep", "update-rules", "update-grid")
# the update rules compared (``update-rules``): (label, update, correction, pair); "per-block"
# corrects in block 1 only, the best single-block choice measured on this 4-block model
UPDATE_RULES = (
    ("paper", "paper", 1.0, False),
    ("residual", "residual", 1.0, False),
    ("step", "step", 1.0, False),
    ("paper, paired", "paper", 1.0, True),
    ("step, paired", "step", 1.0, True),
    ("step, paired, correction 0.5", "step", 0.5, True),
    ("step, paired, correction 0.25", "step", 0.25, True),
    ("step, paired, per-block 0,1,0,0", "step", (0.0, 1.0, 0.0, 0.0), True),
)


@dataclass
class Row:
    method: str  # full, ddim-steps, fora, taylorseer, clusca
    steps: int
    interval: int = 1
    clusters: int = 0
    order: int = 0
    propagation: float = 0.0
    group: str = "main"  # one of GROUPS
    update: str = "paper"  # ClusCa: the update rule, its correction and pairing (ClusCaConfig)
    correction: float | tuple = 1.0
    pair: bool = False
    out: dict = field(default_factory=dict)

    @property
    def rule(self) -> str:
        """The update rule in words ("paper" for the reference's: unpaired, correction 1)."""
        c = self.correction
        words = [self.update] + (["paired"] if self.pair else [])
        if c != 1.0:
            words.append(f"correction {','.join(f'{v:g}' for v in c)}" if isinstance(c, tuple) else f"correction {c:g}")
        return ", ".join(words)

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        if self.method == "ddim-steps":
            return f"DDIM {self.steps} steps"
        if self.method == "fora":
            return f"FORA N={self.interval}"
        if self.method == "taylorseer":
            return f"TaylorSeer N={self.interval} O={self.order}"
        rule = "" if self.rule == "paper" else f" [{self.rule}]"
        return f"ClusCa N={self.interval} K={self.clusters} gamma={self.propagation:g}{rule}"

    @property
    def key(self) -> tuple:
        return (self.method, self.steps, self.interval, self.clusters, self.order, self.propagation, self.update,
                self.correction, self.pair)


def rows_for(steps: int, quick: bool, groups=GROUPS, default=None) -> list[Row]:
    """The rows of ``groups``; ``default``: the family's ClusCa config (its update rule, correction
    and pairing run over the main grid in ``update-grid``)."""
    rows = [Row("full", steps)]
    if quick:
        return rows + [Row("ddim-steps", 10), Row("fora", steps, 4), Row("taylorseer", steps, 5, order=2),
                       Row("clusca", steps, 5, 16, ORDER, 0.005), Row("clusca", steps, 5, 16, ORDER, 0.0),
                       Row("clusca", steps, 5, 16, ORDER, 0.0, "update-rules", "step", 1.0, True)]
    if "main" in groups:
        rows += [Row("ddim-steps", s) for s in (25, 20, 15, 12, 10)]
        rows += [Row("fora", steps, n) for n in range(2, 8)]
        rows += [Row("taylorseer", steps, n, order=o) for o in (1, 2) for n in range(4, 8)]
        rows += [Row("clusca", steps, n, k, ORDER, g)
                 for g in (0.0, 0.005) for k in (4, 8, 16, 32) for n in range(3, 8)]
    if "gamma-sweep" in groups:
        rows += [Row("clusca", steps, 5, 16, ORDER, g, group="gamma-sweep") for g in GAMMA_SWEEP]
    if "update-rules" in groups:
        rows += [Row("taylorseer", steps, n, order=ORDER, group="update-rules") for n in (5, 8)]
        rows += [Row("clusca", steps, n, 16, ORDER, g, "update-rules", update, correction, pair)
                 for n in (5, 8) for g in (0.0, 0.2) for _, update, correction, pair in UPDATE_RULES]
    if "update-grid" in groups and default is not None:
        rule = (default.update.value, default.correction, default.pair)
        rows += [Row("clusca", steps, n, k, ORDER, g, "update-grid", *rule)
                 for g in (0.0, 0.005) for k in (4, 8, 16, 32) for n in range(3, 8)]
    out, seen = [], set()
    for r in rows:  # a row of two groups runs once (in the first)
        if r.key not in seen:
            out.append(r)
            seen.add(r.key)
    return out


def build(k: int, batch: int, engines: Path, loaded, **options) -> Path:
    """One engine set per K (and per non-default k-means option: ``distance``, ``kmeans_iterations``)."""
    suffix = "".join(f"-{v}" for v in options.values())
    out = engines / f"k{k}-b{batch}{suffix}"
    build_engines(loaded, BuildOptions(batch=batch, clusters=k, order=ORDER, **options), out)
    return out


def run_row(pipe: Pipeline, row: Row, labels: list[int], seed: int, cfg_scale: float):
    kwargs = dict(seed=seed, steps=row.steps, cfg_scale=cfg_scale, warmup=WARMUP)
    if row.method in ("full", "ddim-steps"):
        return pipe.generate(labels, method="full", **kwargs)
    if row.method == "fora":
        return pipe.generate(labels, method="fora", interval=row.interval, **kwargs)
    if row.method == "taylorseer":
        return pipe.generate(labels, method="taylorseer", interval=row.interval, order=row.order, **kwargs)
    return pipe.generate(labels, method="clusca", interval=row.interval, order=row.order,
                         propagation=row.propagation, update=row.update, correction=row.correction, pair=row.pair,
                         **kwargs)


def row_flops(row: Row, per_graph: dict[str, int], spec, batch: int) -> int:
    """FLOPs per sample of the row's whole run (graph FLOPs are per engine call of ``batch`` samples)."""
    if row.method in ("full", "ddim-steps"):
        config = ClusCaConfig(interval=1, clusters=0, order=ORDER, warmup=WARMUP)
    else:
        config = ClusCaConfig(interval=row.interval, clusters=row.clusters, order=row.order,
                              propagation=row.propagation, warmup=WARMUP)
    sched = fl.schedule_flops(per_graph, spec, plan(row.steps, config, spec.options.order), config.clusters > 0)
    return sched.total // batch


def fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not np.isfinite(v):
        return "inf"
    return f"{v:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = ("| method | steps | N | K | O | gamma | GFLOPs/sample | FLOPs speed-up | wall speed-up | "
            "FID-digits | class acc. | PSNR vs full (dB) | SSIM vs full |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        o = r.out
        lines.append(
            f"| {r.label} | {r.steps} | {r.interval} | {r.clusters} | {r.order} | {r.propagation:g} | "
            f"{o['gflops']:.2f} | {o['flops_speedup']:.2f}x | {o['wall_speedup']:.2f}x | {o['fid']:.2f} | "
            f"{100 * o['accuracy']:.1f}% | {fmt(o['psnr'])} | {fmt(o['ssim'], 3)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], real_fid: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r.group == "main"]
    full = next(r for r in main if r.method == "full")
    series = {
        "fewer DDIM steps": [r for r in main if r.method == "ddim-steps"],
        "FORA": [r for r in main if r.method == "fora"],
        "TaylorSeer O=1": [r for r in main if r.method == "taylorseer" and r.order == 1],
        "TaylorSeer O=2": [r for r in main if r.method == "taylorseer" and r.order == 2],
    }
    for k in (4, 8, 16, 32):
        for g in (0.0, 0.005):
            series[f"ClusCa K={k} gamma={g:g}"] = [r for r in main if r.method == "clusca" and r.clusters == k
                                                  and r.propagation == g]
    # peers in strong colours, ClusCa in one hue per K (gamma = 0 dashed): no two series alike
    colors = dict(zip(["fewer DDIM steps", "FORA", "TaylorSeer O=1", "TaylorSeer O=2"],
                      ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for k, c in zip((4, 8, 16, 32), ("tab:purple", "tab:brown", "tab:pink", "tab:cyan")):
        for g in (0.0, 0.005):
            colors[f"ClusCa K={k} gamma={g:g}"] = c
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, x, title in ((axes[0], "flops_speedup", "FLOPs speed-up"), (axes[1], "wall_speedup", "wall-clock speed-up")):
        for name, rs in series.items():
            if not rs:
                continue
            rs = sorted(rs, key=lambda r: r.out[x])
            clusca = name.startswith("ClusCa")
            style = dict(marker="o", ms=3.5, lw=1.0 if clusca else 1.8, alpha=0.85 if clusca else 1.0,
                         ls="--" if clusca and "gamma=0 " in name + " " else "-", color=colors[name])
            ax.plot([r.out[x] for r in rs], [r.out["fid"] for r in rs], label=name, **style)
        ax.plot([full.out[x]], [full.out["fid"]], "k*", ms=12, label="full (50 steps)")
        ax.axhline(real_fid, color="grey", ls=":", label="real digits (train split)")
        ax.set_xlabel(f"{title} vs 50 full steps")
        ax.set_title(f"FID-digits vs {title}")
        ax.grid(alpha=0.3)
    fids = [r.out["fid"] for r in rows] + ([real_fid] if np.isfinite(real_fid) else [])
    if min(fids) > 0 and max(fids) / min(fids) > 20:
        axes[0].set_yscale("log")
    axes[0].set_ylabel("FID-digits (lower is better)")
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"{MODEL}: {full.out['samples']} samples per point, 50-step DDIM, CFG 1.5")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paper_rows(rows: list[Row], path: Path | None, args) -> dict[tuple, dict]:
    """The paper's-rule ClusCa results by (N, K, gamma): this run's main rows, else those of
    ``path`` (an earlier quality.json; it must have the same samples, seed, steps and guidance)."""
    out = {(r.interval, r.clusters, r.propagation): r.out for r in rows
           if r.method == "clusca" and r.group == "main" and r.rule == "paper"}
    if out or path is None:
        return out
    data = json.loads(path.read_text())
    for k in ("samples", "seed", "steps", "cfg_scale"):
        if data.get(k) != getattr(args, k):
            raise SystemExit(f"--paper-rows {path}: expected {k} {getattr(args, k)}, got {data.get(k)}")
    return {(r["interval"], r["clusters"], r["propagation"]): r for r in data["rows"]
            if r["method"] == "clusca" and r["group"] == "main" and r.get("update", "paper") == "paper"
            and not r.get("pair", False)}


def update_sections(rows: list[Row], paper: dict, default) -> list[str]:
    """The update rules' tables: PSNR by rule (N, gamma), the rows in full, and the default rule
    against the paper's over the main grid."""
    md = []
    rules = [r for r in rows if r.method == "clusca" and r.clusters == 16 and r.interval in (5, 8)
             and r.propagation in (0.0, 0.2)]  # the paper's rows may stand in main or gamma-sweep
    ts = {r.interval: r for r in rows if r.method == "taylorseer" and r.order == ORDER and r.interval in (5, 8)}
    if any(r.group == "update-rules" for r in rules):
        cols = [(n, g) for n in (5, 8) for g in (0.0, 0.2)]
        head = "| update rule (K=16) | " + " | ".join(f"N={n} gamma={g:g}" for n, g in cols) + " |"
        md += [f"## Update rules (ClusCa K=16, O={ORDER}; PSNR vs full in dB, FID-digits in brackets)", "",
               head, "|" + "---|" * (len(cols) + 1)]
        for label, update, correction, pair in UPDATE_RULES:
            cells = []
            for n, g in cols:
                r = next((r for r in rules if (r.interval, r.propagation, r.update, r.correction, r.pair)
                          == (n, g, update, correction, pair)), None)
                cells.append(f"{fmt(r.out['psnr'])} ({r.out['fid']:.2f})" if r else "-")
            md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("| TaylorSeer O=2 (no fresh tokens) | " + " | ".join(
            f"{fmt(ts[n].out['psnr'])} ({ts[n].out['fid']:.2f})" if n in ts else "-" for n, _ in cols) + " |")
        md += ["", table([r for r in rows if r.group == "update-rules"]), ""]
    rule = (default.update.value, default.correction, default.pair)
    grid = [r for r in rows if r.group == "update-grid" or (  # with the grid's rows that ran in another group
            any(q.group == "update-grid" for q in rows) and r.method == "clusca" and (r.update, r.correction, r.pair)
            == rule and r.interval in range(3, 8) and r.clusters in (4, 8, 16, 32) and r.propagation in (0.0, 0.005))]
    if grid:
        md += [f"## The default update rule ({grid[0].rule}) over the main grid, against the paper's", "",
               "| N | K | gamma | paper PSNR | default PSNR | difference (dB) | paper FID | default FID | "
               "default wall speed-up |", "|" + "---|" * 9]
        worst = None
        for r in sorted(grid, key=lambda r: (r.propagation, r.clusters, r.interval)):
            p = paper.get((r.interval, r.clusters, r.propagation))
            diff = None if p is None else r.out["psnr"] - p["psnr"]
            worst = diff if diff is not None and (worst is None or diff < worst) else worst
            md.append(f"| {r.interval} | {r.clusters} | {r.propagation:g} | {fmt(p and p['psnr'])} | "
                      f"{fmt(r.out['psnr'])} | {fmt(diff)} | {fmt(p and p['fid'])} | {r.out['fid']:.2f} | "
                      f"{r.out['wall_speedup']:.2f}x |")
        md += ["", f"Smallest difference (default minus paper) over the grid: {fmt(worst)} dB.", ""]
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100, help="samples per row (labels 0..9 repeated)")
    p.add_argument("--batch", type=int, default=10, help="samples per engine call (CFG doubles it)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads (1: steadiest timings on a shared machine)")
    p.add_argument("--engines", type=Path, default=ROOT / "engines" / "bench-digits", help="engine cache folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--quick", action="store_true", help="a handful of rows (smoke run)")
    p.add_argument("--groups", default=",".join(GROUPS),
                   help=f"comma-separated row groups among {', '.join(GROUPS)} (full compute always runs)")
    p.add_argument("--paper-rows", type=Path, default=None,
                   help="update-grid without main: a quality.json of the same samples and seed whose main ClusCa rows "
                        "(the paper's rule) the default rule is compared with")
    p.add_argument("--only", default=None, help="comma-separated methods of the rows to run (full always runs), "
                                                "e.g. full,clusca")
    p.add_argument("--distance", choices=["l1", "l2"], default=None, help="k-means distance of the builds "
                                                                          "[default: the build default]")
    p.add_argument("--kmeans-iterations", type=int, default=None, help="Lloyd iterations of the builds")
    p.add_argument("--backend", choices=["onnxruntime", "openvino"], default="onnxruntime")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="openvino: inference precision")
    p.add_argument("--tag", default=None, help="write quality-<tag>.{md,json,png} instead of quality.*")
    p.add_argument("--clusca-grid", default=None, metavar="N,..:K,..:GAMMA,..",
                   help="only these ClusCa rows (no gamma sweep), e.g. 5:4,16:0,0.005")
    args = p.parse_args()
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        p.error(f"--groups: expected some of {', '.join(GROUPS)}, got {', '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log = logging.getLogger("quality")
    log.setLevel(logging.INFO)

    t_start = time.perf_counter()
    labels = [i % 10 for i in range(args.samples)]
    build_options = {k: v for k, v in (("distance", args.distance), ("kmeans_iterations", args.kmeans_iterations))
                     if v is not None}
    loaded = load_model(MODEL)
    rows = rows_for(args.steps, args.quick, groups, loaded.adapter.default_run)
    if args.only:
        keep = set(args.only.split(",")) | {"full"}
        rows = [r for r in rows if r.method in keep]
    if args.clusca_grid:  # e.g. "5:4,16:0,0.005": N values, K values, gamma values of the ClusCa rows
        ns, ks, gs = ([float(v) for v in part.split(",")] for part in args.clusca_grid.split(":"))
        rows = [r for r in rows if r.method != "clusca" or (r.interval in ns and r.clusters in ks
                                                            and r.propagation in gs and r.group == "main")]
    ks = sorted({r.clusters for r in rows if r.clusters} | {16})
    ev = quality.load_evaluator()

    print(f"building engines for K in {ks} (batch {args.batch}, O={ORDER}) in {args.engines}", flush=True)
    pipes = {k: Pipeline.load(build(k, args.batch, args.engines, loaded, **build_options), threads=args.threads,
                              backend=args.backend, precision=args.precision) for k in ks}
    base = pipes[16]
    spec = base.spec
    per_graph = {k: {n: g.total for n, g in fl.count_engine_dir(pipe.manifest).items()} for k, pipe in pipes.items()}

    print("warming up every engine set", flush=True)
    for k, pipe in pipes.items():
        for m in ("full", "clusca", "taylorseer"):
            pipe.generate(labels[:1], method=m, steps=8, seed=args.seed, interval=3 if m != "full" else None)

    full_row = rows[0]
    full = run_row(base, full_row, labels, args.seed, args.cfg_scale)
    full_seconds = [full.seconds]
    reference_images = full.images

    real = None
    try:
        from clusca_trt.digits.data import load_split

        train = load_split("train")
        real = quality.evaluate(train.as_unit(), train.labels, evaluator=ev)
    except Exception as e:  # scikit-learn missing: the calibration row is left out
        log.warning("no real-digits calibration row: %s", e)

    results = {}
    for i, row in enumerate(rows):
        pipe = pipes[row.clusters or 16]
        res = full if row is full_row else run_row(pipe, row, labels, args.seed, args.cfg_scale)
        q = quality.evaluate(res.images, labels, None if row is full_row else reference_images, ev)
        row.out = {
            "samples": q.samples, "seconds": res.seconds, "fid": q.fid, "accuracy": q.accuracy,
            "psnr": q.psnr, "ssim": q.ssim, "gflops": row_flops(row, per_graph[row.clusters or 16], spec, args.batch) / 1e9,
            "step_counts": res.step_counts,
        }
        results[row.key] = res
        print(f"[{i + 1}/{len(rows)}] {row.label:<34} {res.seconds:7.2f} s  FID {q.fid:7.2f}  acc {100 * q.accuracy:5.1f}%"
              f"  PSNR {fmt(q.psnr)}", flush=True)

    again = run_row(base, full_row, labels, args.seed, args.cfg_scale)  # drift of the machine over the run
    full_seconds.append(again.seconds)
    if not np.array_equal(again.latents, full.latents):
        log.warning("full compute is not bit-identical between its two runs")
    base_seconds = float(np.mean(full_seconds))
    full_flops = full_row.out["gflops"]
    for r in rows:
        r.out["flops_speedup"] = full_flops / r.out["gflops"]
        r.out["wall_speedup"] = base_seconds / r.out["seconds"]

    main_rows = [r for r in rows if r.group == "main"]
    sweep = sorted([r for r in rows if r.method == "clusca" and r.interval == 5 and r.clusters == 16
                    and r.order == ORDER and r.propagation in GAMMA_SWEEP and r.rule == "paper"],
                   key=lambda r: r.propagation)
    stem = "quality" if set(groups) == set(GROUPS) or args.quick else "quality-" + "-".join(groups)
    stem = stem if args.tag is None else f"quality-{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    real_fid = real.fid if real else float("nan")
    if "main" in groups or args.quick:
        plot(rows, real_fid, args.out / f"{stem}.png")
    paper = paper_rows(rows, args.paper_rows, args)

    import onnxruntime
    import torch

    elapsed = time.perf_counter() - t_start
    md = [
        f"# Quality vs speed on `{MODEL}` (built-in, trained on scikit-learn digits)",
        "",
        f"Produced by `python {' '.join(sys.argv)}` "
        f"in {elapsed / 60:.0f} min on {base.engine.info.hardware or device_name()} "
        f"(engines: {base.engine.info}; ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}; "
        f"k-means {spec.options.kmeans_iterations} iterations, {spec.options.distance}). "
        f"{args.samples} samples per row (class labels 0..9 repeated), seed {args.seed}, {args.steps}-step DDIM, "
        f"CFG {args.cfg_scale}, engine batch {args.batch} (graph batch {2 * args.batch}), "
        f"{args.threads or 'default'} ONNX Runtime thread(s), warm-up W={WARMUP}, "
        f"fresh tokens random, ClusCa Taylor order O={ORDER}.",
        "",
        f"Full compute: {full_seconds[0]:.2f} s at the start and {full_seconds[1]:.2f} s at the end of the run "
        f"(wall speed-ups use their mean, {base_seconds:.2f} s). "
        + (f"Real digits (the model's 'train' split, {real.samples} images) score FID-digits {real.fid:.2f} and "
           f"class accuracy {100 * real.accuracy:.1f}% against the same held-out reference: the floor of this metric "
           f"at this sample size is about there." if real else ""),
        "",
        *([table(main_rows), ""] if "main" in groups else []),
        *([f"## gamma sweep (ClusCa N=5, K=16, O={ORDER}; the paper's Table 4)", "", table(sweep), ""]
          if sweep and "gamma-sweep" in groups else []),
        *update_sections(rows, paper, loaded.adapter.default_run),
        "## Notes",
        "",
        "* FLOPs: analytic counts of the exported ONNX graphs (`clusca_trt.analysis.flops`: a multiply-add is 2 FLOPs; "
        "element-wise, norm and softmax ops counted per element), summed over the schedule's graph calls (full, "
        "k-means, fresh-token selection, partial, forecast) and divided by the engine batch. The full graph of "
        f"engines that keep Taylor order {ORDER} also updates the caches, so 'full' here is a little more than the "
        "plain model; the host-side DDIM update and guidance are left out.",
        "* Wall speed-up: sampling seconds (engine calls and the host loop, no decoding) of 50 full steps over the "
        "row's. The machine was shared with other jobs, so the wall-clock column is noisy; the FLOPs column is not.",
        "* PSNR/SSIM compare each sample with the full-compute sample of the same seed and label (images in [0, 1], "
        "32x32). FID-digits: Frechet distance of the digits classifier's 64-wide penultimate features to those of "
        "the 449 held-out real digits; with few samples it is biased upwards, compare rows with each other.",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({
        "engine": base.engine.info.to_dict(), "distance": spec.options.distance,
        "kmeans_iterations": spec.options.kmeans_iterations,
        "model": MODEL, "samples": args.samples, "steps": args.steps, "seed": args.seed, "cfg_scale": args.cfg_scale,
        "batch": args.batch, "full_seconds": full_seconds, "real_digits": None if real is None else real.__dict__,
        "groups": list(groups), "device": device_name(),
        "rows": [dict(label=r.label, method=r.method, steps=r.steps, interval=r.interval, clusters=r.clusters,
                      order=r.order, propagation=r.propagation, group=r.group, update=r.update, correction=r.correction,
                      pair=r.pair, **r.out) for r in rows],
    }, indent=1, default=float))
    for pipe in pipes.values():
        pipe.close()
    print("\n".join(md))
    print(f"wrote {args.out / stem}.md, .json in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
