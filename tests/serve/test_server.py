"""A real Ray Serve instance on the tiny DiT engines (batch 2), over HTTP with a real client: results
equal ``Pipeline.generate`` alone under concurrency, compatible requests share runs, every error is one
line of JSON (400, 408, 413, 503, 500), a replica killed mid-request is retried and replaced, slow
clients neither hold slots past the body timeout nor make others wait, and a killed API replica's
request still gets one line of JSON.

One server for the module (about 15 s to start on 2 cores): 2 replicas x 2 requests each + 4 queued
= 8 requests admitted; bodies up to 1 MiB, arriving within 3 s, 16 at once; seed 666 is the injected
engine failure."""

import io
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
requests = pytest.importorskip("requests")

from clusca_trt.runtime.pipeline import Pipeline  # noqa: E402
from clusca_trt.serve.app import API, APP_NAME, ENGINE  # noqa: E402
from clusca_trt.serve.proxy import NO_ANSWER  # noqa: E402
from clusca_trt.serve.server import Server, ServeOptions  # noqa: E402

TOL = 1e-5
FAULT_SEED = 666
LIMIT = 8  # 2 replicas x max_ongoing 2 + max_queue 4
BODY_TIMEOUT_S, MAX_UPLOADS = 3.0, 16


@pytest.fixture(scope="module")
def server(engines_k4):
    options = ServeOptions(engines_k4.directory, port=0, replicas=2, threads=1, max_batch_wait_ms=100,
                           max_ongoing=2, max_queue=4, max_body_mb=1, body_timeout_s=BODY_TIMEOUT_S,
                           max_uploads=MAX_UPLOADS, fault_seed=FAULT_SEED)
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
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form id="form"' in page.text and "http://" not in page.text and "https://" not in page.text
    form = info["form"]
    assert form["family"] == "dit" and not form["images"]  # latents only: the page says so
    assert [f["name"] for f in form["fields"]][:3] == ["class_labels", "seed", "steps"]


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
    (b'{"class_labels": [1], "seed": ' + b"7" * 5000 + b"}", 400, "expected integers of at most 4300 digits"),
], ids=["json", "array", "unknown", "bool", "steps", "label", "config", "png", "samples", "large", "size",
        "digits"])
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


def replica_pids(deployment: str = ENGINE) -> list[int]:
    """Our server's replica processes of ``deployment`` (descendants of this process, by their title)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{APP_NAME}:{deployment}") and _descends_from_us(int(proc.name)):
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


def post_in_flight(server, body: dict) -> tuple[threading.Thread, dict]:
    """POST ``body`` from a thread and return once the server has it in flight (within 30 s): the
    thread and the dict its ``response`` lands in."""
    result = {}
    client = threading.Thread(target=lambda: result.setdefault("response", post(server, body)))
    client.start()
    deadline = time.monotonic() + 30
    while requests.get(server.url + "/info", timeout=10).json()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return client, result


def test_a_replica_killed_mid_request_is_retried_and_replaced(server, pipe):
    pids = replica_pids()
    assert len(pids) == 2
    body = {"class_labels": [3], "seed": 11, "steps": 300}
    client, result = post_in_flight(server, body)
    time.sleep(0.3)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    client.join(120)
    assert_equals_alone(result["response"], pipe, body)  # retried on a replacement replica
    assert requests.get(server.url + "/info", timeout=10).json()["stats"]["retried"] >= 1
    deadline = time.monotonic() + 60
    while len(set(replica_pids()) - set(pids)) < 2 or \
            requests.get(server.url + "/health", timeout=10).json().get("replicas_running") != 2:
        assert time.monotonic() < deadline, "the killed replicas were not replaced"
        time.sleep(0.5)
    fresh = {"class_labels": [8, 2], "seed": 12, "steps": 6}
    assert_equals_alone(post(server, fresh), pipe, fresh)


def test_compare_needs_a_decoder(server):
    response = requests.post(server.url + "/compare", data=b'{"class_labels": [1]}', timeout=30)
    error = assert_one_line_error(response, 400)
    assert "compare needs a model with a decoder" in error


# -- slow clients --------------------------------------------------------------------------------


def stalled_upload(server, sent: bytes = b'{"class_labels": [1', length: int = 1000) -> socket.socket:
    """A client that sends the headers and ``sent`` of a ``length``-byte body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (length, sent))
    return sock


def answer_and_close(sock: socket.socket) -> tuple[int, str]:
    """The status and one-line JSON error the server sends, read until it closes the connection
    (a socket timeout, 15 s, where it never answers)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/json" and b"\n" not in body, data
    return int(lines[0].split()[1]), json.loads(body)["error"]


def test_a_stalled_upload_gets_408_and_others_are_answered_meanwhile(server, pipe):
    sock = stalled_upload(server)
    good = {"class_labels": [4], "seed": 31, "steps": 6}
    assert_equals_alone(post(server, good), pipe, good)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    status, error = answer_and_close(sock)
    assert (status, error) == (408, f"body: expected 1000 bytes within {BODY_TIMEOUT_S:g} s, got 19 bytes")


def test_uploads_past_the_limit_get_503_at_once_and_health_keeps_answering(server, pipe):
    """300 stalled uploads (more than the ~270 that stopped the server before): 16 hold the upload
    slots until their timeout, the others and a normal request get 503 at once, /health answers
    throughout, and afterwards every slot is free again."""
    socks = [stalled_upload(server) for _ in range(300)]
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200, health.text
    busy = assert_one_line_error(post(server, {"class_labels": [1], "steps": 4}), 503)
    assert busy == f"server busy: {MAX_UPLOADS} request bodies arriving (limit {MAX_UPLOADS}), retry later"
    answers = [answer_and_close(sock) for sock in socks]
    codes = [status for status, _ in answers]
    assert set(codes) == {408, 503} and codes.count(408) >= MAX_UPLOADS, codes
    good = {"class_labels": [6], "seed": 32, "steps": 6}
    assert_equals_alone(post(server, good), pipe, good)
    info = requests.get(server.url + "/info", timeout=10).json()
    assert info["receiving"] == 0 and info["in_flight"] == 0


def test_a_killed_api_replica_answers_one_line_of_json(server, pipe):
    """Last in the module: the API replica dies under a request; the proxy's answer is one line of
    JSON (was 500 text/plain); Serve starts a new API replica that answers."""
    pids = replica_pids(API)
    assert len(pids) == 1
    body = {"class_labels": [3], "seed": 41, "steps": 300}
    client, result = post_in_flight(server, body)
    os.kill(pids[0], signal.SIGKILL)
    client.join(120)
    assert assert_one_line_error(result["response"], 500) == NO_ANSWER
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(server.url + "/health", timeout=10).status_code == 200 and replica_pids(API) != pids:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "no new API replica"
        time.sleep(0.5)
    fresh = {"class_labels": [2], "seed": 42, "steps": 6}
    assert_equals_alone(post(server, fresh), pipe, fresh)
