"""``clusca-trt serve`` under stalled uploads (issue 20, part 4): N clients each send the headers and a
few bytes of a POST /generate body, then nothing. Meanwhile one client polls /health and another sends
ordinary requests one after another. Loopback only; bounded (about body timeout + 20 s after the server
is up).

    python benchmarks/serve_stall.py --engines engines/serve-stall --stalled 600 --body-timeout-s 3
    python benchmarks/serve_stall.py --url http://127.0.0.1:8000 --stalled 600 --body-timeout-s 5   # a running server

Without ``--url`` it builds the built-in dit-digits engines into ``--engines`` when there are none
(``clusca-trt build --batch 1``, about 40 s here) and serves them in this process (a local Ray, one
replica, ``--threads``). Measured, as the issue's targets ask:

* /health latency while the stalled uploads are open (target: every one within 1 s);
* ordinary requests (one sample, ``--steps``, ClusCa defaults): their latency alone first (``--baseline``
  requests), then under the stall (target: every one within the worst alone + 1 s);
* each stalled upload: when its answer (408, or 503 past ``--max-uploads``) arrived and when the server
  closed its connection, from the moment its headers were sent (target: within the body timeout; the
  proxy's clock starts when it has read the headers, later than ours by the time it takes to take in
  all N connections: the spread between the first and the last answer; checked here with 0.5 s).

Not a test: nothing here asserts; it prints a table and writes ``--out`` (.json, .md) where given. The
machine may be shared: the load average before and after is recorded with the CPU model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
HEADERS = b"POST /generate HTTP/1.1\r\nHost: stall\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
PARTIAL = b'{"class_labels": [1'


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def timed(fn) -> tuple[float, int | str]:
    t0 = time.perf_counter()
    try:
        status = fn().status_code
    except requests.RequestException as e:
        status = type(e).__name__
    return time.perf_counter() - t0, status


def ordinary(url: str, body: dict) -> tuple[float, int | str]:
    return timed(lambda: requests.post(url + "/generate", data=json.dumps(body), timeout=60))


def health(url: str) -> tuple[float, int | str]:
    return timed(lambda: requests.get(url + "/health", timeout=30))


async def stall_one(host: str, port: int, started: float, out: list) -> None:
    """One stalled upload: (sent s, answered s, closed s, status) from ``started``; None where not seen."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        out.append((None, None, None, type(e).__name__))
        return
    writer.write(HEADERS + PARTIAL)
    await writer.drain()
    sent = time.perf_counter() - started
    answered = closed = None
    status: int | str = "no answer"
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
        if line:
            answered, status = time.perf_counter() - started - sent, int(line.split()[1])
        await asyncio.wait_for(reader.read(), 30)  # until the server closes the connection
        closed = time.perf_counter() - started - sent
    except (asyncio.TimeoutError, OSError, ValueError, IndexError):
        pass
    finally:
        writer.close()
    out.append((sent, answered, closed, status))


def run(url: str, stalled: int, body: dict, baseline: int, body_timeout_s: float) -> dict:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    load_before = [round(v, 2) for v in os.getloadavg()]
    for _ in range(2):
        ordinary(url, body)  # warm the client and the engine path
    alone = [ordinary(url, body) for _ in range(baseline)]
    health_alone = [health(url) for _ in range(baseline)]

    stalls: list = []
    under: dict[str, list] = {"health": [], "ordinary": []}
    done = threading.Event()

    def poll(kind: str, fn, pause: float) -> None:
        while not done.is_set():
            under[kind].append(fn())
            time.sleep(pause)

    async def stall_all() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(stall_one(host, int(port), started, stalls) for _ in range(stalled)))
        return time.perf_counter() - started

    pollers = [threading.Thread(target=poll, args=("health", lambda: health(url), 0.1)),
               threading.Thread(target=poll, args=("ordinary", lambda: ordinary(url, body), 0.0))]
    for t in pollers:
        t.start()
    try:
        wall = asyncio.run(stall_all())
    finally:
        done.set()
        for t in pollers:
            t.join()
    info = requests.get(url + "/info", timeout=30).json()
    answered = [a for _, a, _, _ in stalls if a is not None]
    closed = [c for _, _, c, _ in stalls if c is not None]
    worst_alone = max(s for s, _ in alone)
    result = {
        "stalled": stalled, "body_timeout_s": body_timeout_s, "stall_phase_s": round(wall, 3),
        "stalled_status": dict(Counter(str(s) for *_, s in stalls)),
        "stalled_answered": len(answered), "stalled_closed": len(closed),
        "answer_after_min_s": round(min(answered, default=float("nan")), 3),
        "answer_after_max_s": round(max(answered, default=float("nan")), 3),
        "close_after_max_s": round(max(closed, default=float("nan")), 3),
        "health_alone_max_s": round(max(s for s, _ in health_alone), 4),
        "health_under_stall": len(under["health"]),
        "health_under_stall_max_s": round(max((s for s, _ in under["health"]), default=float("nan")), 4),
        "health_under_stall_p50_s": round(percentile([s for s, _ in under["health"]], 50), 4),
        "health_status": dict(Counter(str(c) for _, c in under["health"])),
        "ordinary_alone_max_s": round(worst_alone, 4),
        "ordinary_alone_p50_s": round(percentile([s for s, _ in alone], 50), 4),
        "ordinary_under_stall": len(under["ordinary"]),
        "ordinary_under_stall_max_s": round(max((s for s, _ in under["ordinary"]), default=float("nan")), 4),
        "ordinary_under_stall_p50_s": round(percentile([s for s, _ in under["ordinary"]], 50), 4),
        "ordinary_status": dict(Counter(str(c) for _, c in under["ordinary"])),
        "api_receiving_after": info.get("receiving"), "api_stats": info.get("stats"),
        "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    result["targets"] = {
        "health_within_1s": result["health_under_stall_max_s"] <= 1.0
        and set(result["health_status"]) == {"200"},
        "ordinary_within_alone_plus_1s": result["ordinary_under_stall_max_s"] <= worst_alone + 1.0
        and set(result["ordinary_status"]) == {"200"},
        "every_stalled_upload_answered_and_closed": len(answered) == len(closed) == stalled,
        "answered_within_body_timeout_plus_0.5s": result["answer_after_max_s"] <= body_timeout_s + 0.5,
    }
    return result


def report(result: dict, header: str) -> str:
    r = result
    rows = [
        ("stalled uploads", f"{r['stalled']} ({r['stalled_status']})"),
        ("answered / closed by the server", f"{r['stalled_answered']} / {r['stalled_closed']}"),
        ("answer after headers, min / max",
         f"{r['answer_after_min_s']} s / {r['answer_after_max_s']} s (body timeout {r['body_timeout_s']:g} s)"),
        ("connection closed after headers, max", f"{r['close_after_max_s']} s"),
        ("/health alone, max", f"{r['health_alone_max_s']} s"),
        ("/health under the stall: n, p50, max",
         f"{r['health_under_stall']}, {r['health_under_stall_p50_s']} s, {r['health_under_stall_max_s']} s "
         f"({r['health_status']})"),
        ("ordinary request alone: p50, max", f"{r['ordinary_alone_p50_s']} s, {r['ordinary_alone_max_s']} s"),
        ("ordinary requests under the stall: n, p50, max",
         f"{r['ordinary_under_stall']}, {r['ordinary_under_stall_p50_s']} s, {r['ordinary_under_stall_max_s']} s "
         f"({r['ordinary_status']})"),
        ("bodies the API replica was receiving afterwards", str(r["api_receiving_after"])),
        ("load average before -> after", f"{r['load_before']} -> {r['load_after']}"),
    ]
    lines = [header, "", "| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows] + [""]
    lines += [f"* {name}: {'met' if ok else 'MISSED'}" for name, ok in r["targets"].items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="A running server (its --body-timeout-s must be given here too).")
    ap.add_argument("--engines", type=Path, default=ROOT / "engines" / "serve-stall",
                    help="Engine directory to serve (built with dit-digits --batch 1 if absent).")
    ap.add_argument("--stalled", type=int, default=600)
    ap.add_argument("--body-timeout-s", type=float, default=3.0)
    ap.add_argument("--max-uploads", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the one replica.")
    ap.add_argument("--steps", type=int, default=50, help="Steps of the ordinary requests.")
    ap.add_argument("--baseline", type=int, default=10, help="Ordinary requests (and /health calls) alone first.")
    ap.add_argument("--out", type=Path, default=None, help="Write <out>.json and <out>.md.")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.stalled + 256)) if hard != resource.RLIM_INFINITY else 2 * args.stalled + 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    body = {"class_labels": [3], "steps": args.steps}
    cpu = cpu_model()
    header = (f"# clusca-trt serve under {args.stalled} stalled uploads ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
              f"`python benchmarks/serve_stall.py {' '.join(sys.argv[1:])}` on {cpu} ({os.cpu_count()} CPUs, "
              f"{platform.platform()}); ordinary requests: one sample, {args.steps} steps, ClusCa defaults.")
    if args.url:
        result = run(args.url.rstrip("/"), args.stalled, body, args.baseline, args.body_timeout_s)
    else:
        sys.path.insert(0, str(ROOT))
        from clusca_trt.serve.server import Server, ServeOptions

        if not (args.engines / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "clusca_trt.cli", "-q", "build", "--batch", "1", "--out",
                            str(args.engines)], check=True)
        options = ServeOptions(args.engines, port=0, threads=args.threads, body_timeout_s=args.body_timeout_s,
                               max_uploads=args.max_uploads)
        with Server(options) as server:
            result = run(server.url, args.stalled, body, args.baseline, args.body_timeout_s)
    result.update(cpu=cpu, cpus=os.cpu_count(), command=" ".join(sys.argv))
    text = report(result, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
