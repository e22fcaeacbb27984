"""The check of ``clusca-trt tune`` (issue 23) in one command: tune a build as a user would, then
re-measure what it chose on other seeds against the best rows of the quality table.

    python benchmarks/tune_check.py engines/default --min-psnr 38             # dit-digits (~10 min here)
    python benchmarks/tune_check.py engines/dit-b2 --min-psnr 40 --samples 50 # a build with no quality table
    python benchmarks/tune_check.py engines/default --min-psnr 38 --tune-json t.json  # check an earlier tune

1. Runs ``clusca-trt tune ENGINE_DIR --min-psnr X`` exactly as a user types it (a subprocess; its
   wall time, the command's own start and loading included, is the "<= 3 minutes" target), with
   ``--json`` to read what it chose. ``--tune-args`` adds options to it.
2. The comparison rows: the caching rows (FORA, TaylorSeer, ClusCa) of the quality table
   (``benchmarks/results/quality.json``, produced by ``benchmarks/quality.py``) for the build's
   model that meet the floor there and that the build runs (its K or K = 0, order <= built), the
   ``--rows`` fastest by the table's wall speed-up. A model without a table: every row of
   ``quality.py``'s grid the build runs, screened on ``--screen`` samples, the ``--rows`` best by
   measured speed-up among those that meet the floor there. The fastest "fewer DDIM steps" row of
   the table that meets the floor is measured too, for information only (tune searches caching
   settings, not the step count).
3. On ``--samples`` other samples (class labels 0, 1, ... mod the classes; seed ``--seed``, not the
   tune's, so other initial noise): full compute first and last, every row in between, each once
   (``--rounds`` repeats the whole sequence); PSNR / SSIM of each row vs full compute, sample by
   sample (``clusca_trt.analysis.tune``'s scores: images where the build decodes, else latents);
   wall speed-up = the mean of full compute's times over the row's (``quality.py``'s convention).
4. Verdicts: the chosen setting's mean PSNR >= the floor; its speed-up >= 90% of the best speed-up
   among the rows whose PSNR here meets the floor; the tune's wall time <= ``--max-tune-minutes``.

Writes ``tune-check-<model>.md`` and ``.json`` into ``--out``. Timings are only as quiet as the
machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clusca_trt.analysis import tune as T  # noqa: E402
from clusca_trt.config import ClusCaConfig  # noqa: E402
from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def run_tune(engine_dir: Path, floor: float, extra: list[str], json_path: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "clusca_trt.cli", "tune", str(engine_dir), "--min-psnr", f"{floor:g}", *extra,
           "--json", str(json_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ clusca-trt " + " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"tune failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds, done.stdout


def runnable(row: dict, built_k: int, built_order: int) -> bool:
    return row["clusters"] in (0, built_k) and row["order"] <= built_order


def row_config(row: dict, defaults: ClusCaConfig, warmup: int) -> ClusCaConfig | None:
    """A quality-table row as the ClusCaConfig it ran (quality.py: warm-up 2, fresh random)."""
    m = row["method"]
    if m not in ("fora", "taylorseer", "clusca"):
        return None
    return ClusCaConfig(interval=row["interval"], clusters=row["clusters"], order=row["order"],
                        propagation=row["propagation"] if m == "clusca" else defaults.propagation, warmup=warmup,
                        fresh="random")


def grid_rows(steps: int, built_k: int, built_order: int) -> list[dict]:
    """quality.py's grid (its rows_for) at the build's K, as table-like rows."""
    import quality as qb

    out = []
    for r in qb.rows_for(steps, quick=False):
        if r.method not in ("fora", "taylorseer", "clusca") or r.group != "main":
            continue
        k = built_k if r.method == "clusca" else 0
        row = dict(method=r.method, interval=r.interval, clusters=k, order=r.order, propagation=r.propagation,
                   label=r.label.replace(f"K={r.clusters}", f"K={k}"))
        if runnable(row, built_k, built_order) and row not in out:
            out.append(row)
    return out


class Measure:
    def __init__(self, pipe, labels: list[int], seed: int, steps: int):
        self.pipe, self.labels, self.seed, self.steps = pipe, labels, seed, steps
        self.reference = None
        self.data_range = 1.0
        self.scored_on = "images"

    def run(self, config: ClusCaConfig, n: int | None = None, steps: int | None = None):
        labels = self.labels[: n or len(self.labels)]
        return self.pipe.generate(labels, seed=self.seed, steps=steps or self.steps, config=config)

    def score(self, res, n: int | None = None) -> tuple[list[float], list[float]]:
        frames, _ = T.score_frames(res)
        ref = self.reference[: len(frames)]
        with_ssim = frames.shape[2] >= 11 and frames.shape[3] >= 11
        return T.sample_scores(frames, ref, self.data_range, with_ssim)

    def set_reference(self, res) -> None:
        frames, self.scored_on = T.score_frames(res)
        self.reference = frames
        if self.scored_on == "latents":
            self.data_range = float(frames.max() - frames.min()) or 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--min-psnr", type=float, required=True)
    p.add_argument("--samples", type=int, default=200, help="check samples (other seeds than the tune's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the check samples [default: the tune's + 1000]")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the check's runs")
    p.add_argument("--rows", type=int, default=3, help="comparison rows (the fastest that meet the floor)")
    p.add_argument("--screen", type=int, default=8, help="screening samples for a model without a quality table")
    p.add_argument("--rounds", type=int, default=1, help="repeats of the measured sequence (timings: medians)")
    p.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    p.add_argument("--tune-json", type=Path, default=None, help="check this tune's result instead of tuning now")
    p.add_argument("--tune-args", default="", help="extra options for clusca-trt tune (one string)")
    p.add_argument("--max-tune-minutes", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()

    cpu = cpu_model()
    load0 = os.getloadavg()
    print(f"tune check on {cpu} ({os.cpu_count()} CPUs), load average {load0[0]:.2f} at the start", flush=True)

    tune_seconds = None
    if args.tune_json is None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_json = Path(tmp) / "tune.json"
            tune_seconds, _ = run_tune(args.engine_dir, args.min_psnr, args.tune_args.split(), tmp_json)
            report = json.loads(tmp_json.read_text())
    else:
        report = json.loads(args.tune_json.read_text())
    if report.get("chosen") is None:
        raise SystemExit(f"the tune chose nothing: {report.get('error')}")
    chosen = ClusCaConfig(**report["chosen"]["config"])
    cal = report["calibration"]
    seed = args.seed if args.seed is not None else cal["seed"] + 1000
    if seed == cal["seed"]:
        raise SystemExit(f"expected a check seed other than the tune's ({cal['seed']}), got {seed}")
    steps = cal["steps"]

    pipe = Pipeline.load(args.engine_dir, threads=args.threads)
    if pipe.family.name != "dit":
        raise SystemExit(f"the check samples class labels: expected a dit build, got {pipe.family.name}")
    spec = pipe.spec
    built_k = spec.options.clusters if spec.clustered_groups else 0
    built_order = spec.options.order
    model = pipe.model["name"]
    classes = int(pipe.model["sampling"]["num_classes"])
    labels = [i % classes for i in range(args.samples)]
    m = Measure(pipe, labels, seed, steps)
    full = pipe.resolve_config("full")

    # the comparison rows
    table = json.loads(args.table.read_text()) if args.table.is_file() else None
    ddim = None
    if table is not None and table.get("model") == model:
        source = f"{args.table.relative_to(ROOT) if args.table.is_relative_to(ROOT) else args.table}"
        main_rows = [r for r in table["rows"] if r.get("group") == "main"]
        cands = [r for r in main_rows if r["method"] in ("fora", "taylorseer", "clusca")
                 and r.get("psnr") is not None and r["psnr"] >= args.min_psnr and runnable(r, built_k, built_order)]
        cands.sort(key=lambda r: -r["wall_speedup"])
        rows = cands[: args.rows]
        steps_rows = [r for r in main_rows if r["method"] == "ddim-steps" and r.get("psnr") is not None
                      and r["psnr"] >= args.min_psnr]
        ddim = max(steps_rows, key=lambda r: r["wall_speedup"]) if steps_rows else None
        how = (f"the {len(rows)} fastest caching rows of {source} (by its wall speed-up) that meet "
               f"{args.min_psnr:g} dB there and that this build runs (K in {{0, {built_k}}}, O <= {built_order})")
    else:
        grid = grid_rows(steps, built_k, built_order)
        print(f"no quality table for {model}: screening {len(grid)} grid rows on {args.screen} samples", flush=True)
        m.set_reference(m.run(full, args.screen))
        base = m.run(full, args.screen).seconds
        screened = []
        for r in grid:
            res = m.run(row_config(r, pipe.defaults, 2), args.screen)
            psnr = float(np.mean(m.score(res)[0]))
            screened.append(dict(r, psnr=psnr, wall_speedup=base / res.seconds))
            print(f"  {r['label']:<36} PSNR {psnr:6.2f}  {base / res.seconds:5.2f}x", flush=True)
        cands = sorted((r for r in screened if r["psnr"] >= args.min_psnr), key=lambda r: -r["wall_speedup"])
        rows = cands[: args.rows]
        how = (f"the {len(rows)} fastest rows of quality.py's grid at K={built_k} that meet {args.min_psnr:g} dB "
               f"on {args.screen} screening samples")
    measured = [("tuned: " + T.label(chosen), chosen)]
    measured += [(r["label"], row_config(r, pipe.defaults, 2)) for r in rows]
    if ddim is not None:
        measured.append((f"{ddim['label']} (fewer steps: information only)", full))

    # the measurement: full first and last, every row in between
    times: dict[str, list[float]] = {name: [] for name, _ in measured}
    full_times: list[float] = []
    scores: dict[str, tuple[list[float], list[float]]] = {}
    print(f"measuring {len(measured)} rows + full compute on {args.samples} samples (seed {seed}, {steps} steps)",
          flush=True)
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        res = m.run(full)
        full_times.append(res.seconds)
        if m.reference is None or len(m.reference) < args.samples:
            m.set_reference(res)
        for name, config in measured:
            is_ddim = ddim is not None and name.startswith(ddim["label"])
            res = m.run(config, steps=ddim["steps"] if is_ddim else None)
            times[name].append(res.seconds)
            if name not in scores:
                scores[name] = m.score(res)
            print(f"  [{rnd + 1}/{args.rounds}] {name:<52} {res.seconds:8.2f} s  PSNR "
                  f"{np.mean(scores[name][0]):6.2f}", flush=True)
        full_times.append(m.run(full).seconds)
    base = statistics.mean(full_times)
    results = []
    for name, config in measured:
        psnr, ssim = scores[name]
        results.append({"row": name, "config": None if config is None else T.Candidate(config, name).to_dict()["config"],
                        "psnr": float(np.mean(psnr)), "psnr_se": T.standard_error(psnr, 0.0),
                        "ssim": float(np.mean(ssim)) if ssim else None, "seconds": statistics.median(times[name]),
                        "wall_speedup": base / statistics.median(times[name])})
    tuned = results[0]
    comparable = [r for r in results[1:] if "information only" not in r["row"] and r["psnr"] >= args.min_psnr]
    best = max(comparable, key=lambda r: r["wall_speedup"]) if comparable else None
    verdicts = {
        "psnr": tuned["psnr"] >= args.min_psnr,
        "speedup": best is None or tuned["wall_speedup"] >= 0.9 * best["wall_speedup"],
        "tune_minutes": tune_seconds is None or tune_seconds <= 60 * args.max_tune_minutes,
    }
    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()

    lines = [
        f"# clusca-trt tune check: `{model}` ({args.engine_dir}), floor {args.min_psnr:g} dB",
        "",
        f"Produced by `python benchmarks/tune_check.py {args.engine_dir} --min-psnr {args.min_psnr:g}"
        f"{f' --samples {args.samples}' if args.samples != 200 else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}{f' --rounds {args.rounds}' if args.rounds != 1 else ''}` "
        f"on {cpu} ({os.cpu_count()} CPUs; load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end), "
        f"{pipe.engine.info}. Tune: {report['calibration']['samples']} calibration samples, seed {cal['seed']}, "
        f"{steps} steps" + (f", {tune_seconds / 60:.2f} min wall (the command, start to end)" if tune_seconds else
                            f" (from {args.tune_json})") + ". "
        f"Check: {args.samples} samples of seed {seed} (other noise than the tune's), full compute first and last "
        f"(mean {base:.2f} s), scored on {m.scored_on}. Comparison rows: {how}.",
        "",
        "| row | PSNR vs full (dB) | SSIM | seconds | wall speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ssim = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['row']} | {r['psnr']:.2f} +- {r['psnr_se']:.2f} | {ssim} | {r['seconds']:.2f} | "
                     f"{r['wall_speedup']:.2f}x |")
    lines += [
        "",
        f"* chosen mean PSNR {tuned['psnr']:.2f} dB >= {args.min_psnr:g}: {'PASS' if verdicts['psnr'] else 'FAIL'}",
        (f"* chosen speed-up {tuned['wall_speedup']:.2f}x >= 90% of the best comparison row meeting the floor here "
         f"({best['row']}, {best['wall_speedup']:.2f}x -> {0.9 * best['wall_speedup']:.2f}x): "
         f"{'PASS' if verdicts['speedup'] else 'FAIL'}") if best else "* no comparison row meets the floor here",
        (f"* tune wall time {tune_seconds / 60:.2f} min <= {args.max_tune_minutes:g} min: "
         f"{'PASS' if verdicts['tune_minutes'] else 'FAIL'}") if tune_seconds is not None else "* tune not timed here",
        "",
        "## The tune's Pareto front (calibration set)",
        "",
        "| setting | PSNR (dB) | samples | speed-up predicted | speed-up measured | floor |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["front"]:
        mark = " (chosen)" if c["label"] == report["chosen"]["label"] else ""
        meas = "-" if c["measured_speedup"] is None else f"{c['measured_speedup']:.2f}x"
        lines.append(f"| {c['label']}{mark} | {c['psnr']:.2f} | {c['samples']} | {c['predicted_speedup']:.2f}x | "
                     f"{meas} | {c['verdict']} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tune-check-{model}.md").write_text(text)
    (args.out / f"tune-check-{model}.json").write_text(json.dumps({
        "cpu": cpu, "engine": str(pipe.engine.info), "floor": args.min_psnr, "samples": args.samples, "seed": seed,
        "tune_seconds": tune_seconds, "tune": report, "rows": results, "verdicts": verdicts,
        "load_average": [load0[0], load1[0]], "elapsed_seconds": elapsed,
    }, indent=1))
    pipe.close()
    print(f"wrote {args.out / f'tune-check-{model}.md'} and .json")
    if not all(verdicts.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
