"""``clusca-trt serve`` from the command line: a one-line error without Ray or with a bad engine
directory, and a real server process that answers, then exits cleanly on Ctrl-C (SIGINT)."""

import io
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from clusca_trt.cli import main


def test_serve_without_ray_says_how_to_install(monkeypatch, engines_k4):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = CliRunner().invoke(main, ["serve", str(engines_k4.directory)])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "pip install 'clusca-trt[serve]'" in r.output


def test_serve_refuses_a_missing_engine_dir(tmp_path):
    pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
    r = CliRunner().invoke(main, ["serve", str(tmp_path / "none")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: ")


def test_help_lists_serve():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "serve" in r.output


def test_serve_answers_then_stops_on_ctrl_c(engines_k4):
    pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
    requests = pytest.importorskip("requests")
    cmd = [sys.executable, "-m", "clusca_trt.cli", "-q", "serve", str(engines_k4.directory), "--port", "0",
           "--threads", "1", "--max-batch-wait-ms", "0"]
    # Ctrl-C as a terminal delivers it: SIGINT at its default (a pytest-xdist worker ignores it, and a
    # child inherits an ignored signal)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving on "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120) or proc.poll() is not None, "no 'serving on' line in 120 s"
        assert proc.poll() is None, proc.stderr.read()
        url = next(line for line in lines if line.startswith("serving on ")).split()[-1]
        assert requests.get(url + "/health", timeout=10).status_code == 200
        body = {"class_labels": [2, 9], "seed": 4, "steps": 5, "method": "full"}
        r = requests.post(url + "/generate", data=json.dumps(body), timeout=60)
        assert r.status_code == 200 and np.load(io.BytesIO(r.content))["latents"].shape == (2, 4, 16, 16)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:  # only if it hung: its own process group, started above
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(ProcessLookupError):  # Ray's processes went with it
        os.killpg(proc.pid, 0)


def test_serve_to_an_address_where_no_cluster_listens_fails_in_one_line(engines_k4):
    """A bounded wait (server.CONNECT_WAIT_S, 10 s), then one line; before, Ray retried forever."""
    pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
    from clusca_trt.serve.server import _free_port

    address = f"127.0.0.1:{_free_port('127.0.0.1')}"  # nothing listens there
    cmd = [sys.executable, "-m", "clusca_trt.cli", "-q", "serve", str(engines_k4.directory), "--address", address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-2000:])
    assert proc.stdout == "" and proc.stderr == (f"Error: --address {address}: expected a Ray cluster listening "
                                                 f"there, got no connection in 10 s (Connection refused)\n")
