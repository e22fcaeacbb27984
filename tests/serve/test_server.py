"""A real Ray Serve instance on the tiny DiT engines (batch 2), over HTTP with a real client: results
equal ``Pipeline.generate`` alone under concurrency, compatible requests share runs, every error is one
line of JSON (400, 413, 503, 500), and a replica killed mid-request is retried and replaced.

One server for the module (about 15 s to start on 2 cores): 2 replicas x 2 requests each + 4 queued
= 8 requests admitted; bodies up to 1 MiB; seed 666 is the injected engine failure."""

import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
requests = pytest.importorskip("requests")

from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.serve.app import APP_NAME, ENGINE  # noqa: E402
from clusca_trt.serve.server import Server, ServeOptions  # noqa: E402

TOL = 1e-5
FAULT_SEED = 666
LIMIT = 8  # 2 replicas x max_ongoing 2 + max_queue 4


@pytest.fixture(scope="module")
def server(engines_k4):
    options = ServeOptions(engines_k4.directory, port=0, replicas=2, threads=1, max_batch_wait_ms=100,
                           max_ongoing=2, max_queue=4, max_body_mb=1, fault_seed=FAULT_SEED)
    with Server(options) as s:
        yield s


@pytest.fixture(scope="module")
def pipe(engines_k4):
    return Pipeline.load(engines_k4.directory)


def post(server, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.url + "/generate", data=data, headers={"Content-Type": "application/json"},
                         timeout=120, **kw)


def post_all(server, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: post(server, b), bodies))


def assert_one_line_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "\n" not in response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    return body["error"]


def assert_equals_alone(response, pipe, body):
    assert response.status_code == 200, response.text
    got = np.load(io.BytesIO(response.content))
    args = {k: v for k, v in body.items() if k != "format"}
    want = pipe.generate(**args)
    assert got["labels"].tolist() == body["class_labels"]
    err = float(np.abs(got["latents"] - want.latents).max() / np.abs(want.latents).max())
    assert err <= TOL, err


def test_health_and_info(server, engines_k4):
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["replicas_running"] == 2
    info = requests.get(server.url + "/info", timeout=10).json()
    assert info["engine"]["key"] == engines_k4.data["key"]
    assert info["engine"]["build"]["batch"] == 2
    assert info["serve"]["admission_limit"] == LIMIT and info["serve"]["replicas"] == 2
    assert_one_line_error(requests.get(server.url + "/nope", timeout=10), 404)


def test_concurrent_requests_equal_their_runs_alone(server, pipe):
    """8 concurrent requests, two settings, 1 or 2 samples each: whoever shares a run, each equals its solo run."""
    bodies = [{"class_labels": [(3 * i) % 10] * (1 + i % 2), "seed": 100 + i, "steps": 10,
               "method": "clusca" if i % 3 else "fora", "interval": 3} for i in range(8)]
    for body, response in zip(bodies, post_all(server, bodies)):
        assert_equals_alone(response, pipe, body)


def test_compatible_requests_share_a_run(server, pipe):
    before = requests.get(server.url + "/info", timeout=10).json()["stats"]["shared_run_responses"]
    bodies = [{"class_labels": [i], "seed": i, "steps": 8} for i in range(4)]
    responses = post_all(server, bodies)
    for body, response in zip(bodies, responses):
        assert_equals_alone(response, pipe, body)
    sizes = [int(r.headers["X-Batch-Requests"]) for r in responses]
    assert max(sizes) == 2 and all(int(r.headers["X-Batch-Samples"]) <= 2 for r in responses), sizes
    after = requests.get(server.url + "/info", timeout=10).json()["stats"]["shared_run_responses"]
    assert after - before == sizes.count(2)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "got invalid JSON"),
    (b"[]", 400, "expected a JSON object, got list"),
    ({"class_labels": [1], "colour": "red"}, 400, "unknown field 'colour'"),
    ({"class_labels": [1], "seed": True}, 400, "seed: expected an integer, got true"),
    ({"class_labels": [1], "steps": 0}, 400, "steps: expected an integer 1..1000"),
    ({"class_labels": [12]}, 400, "class labels must be in 0..9"),
    ({"class_labels": [1], "method": "taylorseer", "order": 0}, 400, "taylorseer needs order >= 1"),
    ({"class_labels": [1], "format": "png"}, 400, "format png needs a model with a decoder"),
    ({"class_labels": [1] * 65}, 400, "expected at most 64 samples per request, got 65"),
    ({"class_labels": [1] * 30000}, 400, "expected at most 64 samples per request, got 30000"),  # parsed off-loop
    (b'{"class_labels": [' + b"1, " * 2**19 + b"1]}", 413, "body: expected at most 1048576 bytes"),
], ids=["json", "array", "unknown", "bool", "steps", "label", "config", "png", "samples", "large", "size"])
def test_bad_requests_get_one_line_json(server, body, status, message):
    assert message in assert_one_line_error(post(server, body), status)


def test_a_full_queue_gets_503(server):
    """12 slow requests at once: the 8 admitted are answered, the other 4 get 503 at once."""
    bodies = [{"class_labels": [1], "seed": i, "steps": 600} for i in range(12)]
    responses = post_all(server, bodies)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * LIMIT + [503] * (12 - LIMIT), codes
    for r in responses:
        if r.status_code == 503:
            assert "server busy" in assert_one_line_error(r, 503)


def test_an_engine_failure_gets_500_and_the_replica_keeps_serving(server, pipe):
    good = {"class_labels": [5], "seed": 7, "steps": 6}
    failing, mate = post_all(server, [{"class_labels": [5], "seed": FAULT_SEED, "steps": 6}, good])
    assert "injected engine failure" in assert_one_line_error(failing, 500)
    assert_equals_alone(mate, pipe, good)  # if it shared the failed run, it was run again alone
    replica = failing.headers["X-Replica"]
    for _ in range(40):  # the failed replica answers again (routing picks one of two)
        response = post(server, good)
        assert_equals_alone(response, pipe, good)
        if response.headers["X-Replica"] == replica:
            break
    else:
        pytest.fail(f"replica {replica} never answered after its failure")


def engine_replica_pids() -> list[int]:
    """Our server's Engine replica processes (descendants of this process, by their title)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{APP_NAME}:{ENGINE}") and _descends_from_us(int(proc.name)):
            found.append(int(proc.name))
    return found


def _descends_from_us(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def test_a_replica_killed_mid_request_is_retried_and_replaced(server, pipe):
    pids = engine_replica_pids()
    assert len(pids) == 2
    body = {"class_labels": [3], "seed": 11, "steps": 300}
    result = {}
    client = threading.Thread(target=lambda: result.setdefault("response", post(server, body)))
    client.start()
    deadline = time.monotonic() + 30
    while requests.get(server.url + "/info", timeout=10).json()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    client.join(120)
    assert_equals_alone(result["response"], pipe, body)  # retried on a replacement replica
    assert requests.get(server.url + "/info", timeout=10).json()["stats"]["retried"] >= 1
    deadline = time.monotonic() + 60
    while len(set(engine_replica_pids()) - set(pids)) < 2 or \
            requests.get(server.url + "/health", timeout=10).json().get("replicas_running") != 2:
        assert time.monotonic() < deadline, "the killed replicas were not replaced"
        time.sleep(0.5)
    fresh = {"class_labels": [8, 2], "seed": 12, "steps": 6}
    assert_equals_alone(post(server, fresh), pipe, fresh)
