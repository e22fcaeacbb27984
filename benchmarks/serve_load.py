"""Load test of ``clusca-trt serve``: N concurrent clients for T seconds, each sending POST /generate
one request after another (closed loop); throughput (images/s), p50/p95/p99 latency, errors.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 1,16 --seconds 30   # a running server
    python benchmarks/serve_load.py --builds 1,8 --clients 1,16 --seconds 30                   # builds, serves, loads

With ``--builds``: for each batch B it builds the built-in dit-digits engines (``clusca-trt build
--batch B --out engines/serve-load/batch-B``; reused when up to date), starts ``clusca-trt serve`` on
them (a local Ray; ``--replicas``, ``--threads``, ``--max-batch-wait-ms`` passed on), runs every client
count against it and stops it; then writes ``serve-load.{json,md}`` to ``--out``.

Every request asks for one sample (``--samples``) with its own seed: 50-step DDIM, ClusCa with the
build's defaults unless ``--steps``/``--method`` say otherwise. Each run first loads the server for
``--warmup`` seconds (not counted). Throughput: samples of the 200 answers that completed inside the
T-second window, over T. Latency: of the requests sent inside the window. The issue's targets
(batch-8 build, 16 clients): throughput >= 3x one client's, p99 latency <= 3x one client's p50.
Not a test: nothing here asserts a timing. The machine is shared: the load average before and after
each run is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "clusca_trt.cli"]


@dataclass
class Sample:
    start: float
    end: float
    status: int | str  # HTTP status, or the client error's name
    samples: int
    batch_requests: int | None


@dataclass
class RunResult:
    label: str
    clients: int
    seconds: float
    requests: int
    images: int
    images_per_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    errors: int
    error_kinds: dict
    mean_batch_requests: float | None
    load_before: list
    load_after: list


def run_load(url: str, clients: int, seconds: float, warmup: float, body: dict, label: str) -> RunResult:
    """``clients`` closed-loop clients for ``warmup + seconds``; the last ``seconds`` are measured."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    records: list[Sample] = []
    lock = threading.Lock()
    t_start = time.monotonic()
    t0, t1 = t_start + warmup, t_start + warmup + seconds

    def client(index: int) -> None:
        session = requests.Session()
        n = 0
        while time.monotonic() < t1:
            payload = dict(body, seed=1_000_000 * index + n, class_labels=[(index + n) % 10] * body["samples"])
            payload.pop("samples")
            begin = time.monotonic()
            try:
                r = session.post(url + "/generate", data=json.dumps(payload), timeout=600,
                                 headers={"Content-Type": "application/json"})
                status, batch = r.status_code, r.headers.get("X-Batch-Requests")
            except requests.RequestException as e:
                status, batch = type(e).__name__, None
            with lock:
                records.append(Sample(begin, time.monotonic(), status, body["samples"],
                                      int(batch) if batch else None))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [r for r in records if t0 <= r.start < t1]
    done = [r for r in records if t0 <= r.end <= t1 and r.status == 200]
    ok = [r for r in sent if r.status == 200]
    latencies = np.array([r.end - r.start for r in ok]) if ok else np.array([np.nan])
    errors = [r for r in sent if r.status != 200]
    kinds: dict = {}
    for r in errors:
        kinds[str(r.status)] = kinds.get(str(r.status), 0) + 1
    batches = [r.batch_requests for r in ok if r.batch_requests is not None]
    return RunResult(
        label=label, clients=clients, seconds=seconds, requests=len(sent), images=sum(r.samples for r in done),
        images_per_s=sum(r.samples for r in done) / seconds,
        p50_s=float(np.percentile(latencies, 50)), p95_s=float(np.percentile(latencies, 95)),
        p99_s=float(np.percentile(latencies, 99)), mean_s=float(latencies.mean()), errors=len(errors),
        error_kinds=kinds, mean_batch_requests=float(np.mean(batches)) if batches else None,
        load_before=load_before, load_after=[round(v, 2) for v in os.getloadavg()],
    )


class ServerProcess:
    """``clusca-trt serve`` in its own process group, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, engine_dir: Path, args: argparse.Namespace):
        self.cmd = CLI + ["-q", "serve", str(engine_dir), "--port", "0", "--replicas", str(args.replicas),
                          "--max-batch-wait-ms", str(args.max_batch_wait_ms), "--max-queue", str(args.max_queue)]
        if args.threads:
            self.cmd += ["--threads", str(args.threads)]
        self.url = None

    def __enter__(self) -> "ServerProcess":
        print("$", " ".join(["clusca-trt"] + self.cmd[len(CLI):]), flush=True)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)
        for line in self.proc.stdout:
            if line.startswith("serving on "):
                self.url = line.split()[-1]
                break
        if self.url is None:
            raise RuntimeError(f"clusca-trt serve exited with {self.proc.wait()} before serving")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its pipe drained
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group, started above
            self.proc.wait()


def build(batch: int, engines: Path) -> Path:
    out = engines / f"batch-{batch}"
    cmd = CLI + ["build", "--batch", str(batch), "--out", str(out)]
    print("$", " ".join(["clusca-trt"] + cmd[len(CLI):]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def table(results: list[RunResult]) -> str:
    lines = ["| server | clients | requests | images/s | p50 s | p95 s | p99 s | errors | mean requests per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        batch = f"{r.mean_batch_requests:.2f}" if r.mean_batch_requests is not None else ""
        lines.append(f"| {r.label} | {r.clients} | {r.requests} | {r.images_per_s:.2f} | {r.p50_s:.3f} | "
                     f"{r.p95_s:.3f} | {r.p99_s:.3f} | {r.errors} | {batch} |")
    return "\n".join(lines)


def targets(results: list[RunResult], label: str, many: int) -> dict | None:
    """The issue's targets for ``label``: ``many`` clients against one client."""
    one = next((r for r in results if r.label == label and r.clients == 1), None)
    lots = next((r for r in results if r.label == label and r.clients == many), None)
    if one is None or lots is None:
        return None
    throughput, p99 = lots.images_per_s / one.images_per_s, lots.p99_s / one.p50_s
    return {"server": label, "clients": many, "throughput_ratio": round(throughput, 2),
            "throughput_target": 3.0, "throughput_met": throughput >= 3.0,
            "p99_over_single_p50": round(p99, 2), "p99_target": 3.0, "p99_met": p99 <= 3.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server (e.g. http://127.0.0.1:8000).")
    where.add_argument("--builds", help="Comma-separated engine batches: build dit-digits, serve and load each.")
    ap.add_argument("--clients", default="1,16", help="Comma-separated concurrent client counts.")
    ap.add_argument("--seconds", type=float, default=30.0, help="Measured seconds per run.")
    ap.add_argument("--warmup", type=float, default=5.0, help="Unmeasured seconds of load before each run.")
    ap.add_argument("--samples", type=int, default=1, help="Samples (class labels) per request.")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--method", default="clusca")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per replica.")
    ap.add_argument("--max-batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--engines", type=Path, default=ROOT / "engines" / "serve-load")
    ap.add_argument("--out", type=Path, default=None,
                    help="Write <out>.json and <out>.md [default with --builds: benchmarks/results/serve-load].")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    body = {"samples": args.samples, "steps": args.steps, "method": args.method}
    results: list[RunResult] = []

    def load_all(url: str, label: str) -> None:
        for n in clients:
            r = run_load(url, n, args.seconds, args.warmup, body, label)
            print(f"{label}, {n} clients: {r.images_per_s:.2f} images/s, p50 {r.p50_s:.3f} s, p99 {r.p99_s:.3f} s, "
                  f"{r.errors} errors, load {r.load_before} -> {r.load_after}", flush=True)
            results.append(r)

    if args.url:
        load_all(args.url.rstrip("/"), args.url)
        out = args.out
    else:
        for b in [int(v) for v in args.builds.split(",")]:
            engine_dir = build(b, args.engines)
            with ServerProcess(engine_dir, args) as server:
                load_all(server.url, f"dit-digits --batch {b}")
        out = args.out or ROOT / "benchmarks" / "results" / "serve-load"
    labels = list(dict.fromkeys(r.label for r in results))
    checks = [t for t in (targets(results, label, max(clients)) for label in labels) if t]
    print(table(results))
    for t in checks:
        print(f"{t['server']}: {t['clients']} clients give {t['throughput_ratio']}x one client's throughput "
              f"(target >= 3x), p99 {t['p99_over_single_p50']}x a single request's latency (target <= 3x)")
    if out is None:
        return
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    report = {"settings": settings, "machine": machine, "runs": [asdict(r) for r in results], "targets": checks}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# clusca-trt serve under load ({time.strftime('%Y-%m-%d')})", "",
          f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}` on {machine['cpus']} CPUs "
          f"({machine['platform']}); every request: {args.samples} sample(s), {args.steps} steps, {args.method}; "
          f"{args.replicas} replica(s), batch window {args.max_batch_wait_ms} ms; {args.seconds:g} s measured after "
          f"{args.warmup:g} s of warm-up per row.", "", table(results), ""]
    for t in checks:
        md.append(f"* {t['server']}: {t['clients']} clients give **{t['throughput_ratio']}x** one client's throughput "
                  f"(target >= 3x: {'met' if t['throughput_met'] else 'missed'}); p99 latency is "
                  f"**{t['p99_over_single_p50']}x** a single request's (one client's p50; target <= 3x: "
                  f"{'met' if t['p99_met'] else 'missed'}).")
    md.append("")
    md.append("Load average (1, 5, 15 min) before and after each row: "
              + "; ".join(f"{r.label} x{r.clients}: {r.load_before} -> {r.load_after}" for r in results) + ".")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"{out.with_suffix('.json')}, {out.with_suffix('.md')}: written")


if __name__ == "__main__":
    main()
