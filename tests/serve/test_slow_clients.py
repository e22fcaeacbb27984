"""The server's two layers against slow and broken clients, without a server: ``proxy.WholeBodies`` and
``proxy.JsonErrors`` (the ASGI middlewares Serve's proxy runs) on hand-made ASGI messages, and the
``Api``'s own ``Uploads`` on Starlette requests. Timeouts here are 0.2 s; no timing is asserted beyond
"answered before a stalled body would ever have arrived"."""

import asyncio
import json

import pytest

from clusca_trt.serve.proxy import NO_ANSWER, JsonErrors, Limits, WholeBodies

LIMITS = Limits(body_timeout_s=0.2, max_uploads=2, max_body_bytes=100)
STALL = 3600.0  # a client that never sends the rest


def scope(method="POST", length: int | str | None = 10, path="/generate"):
    headers = [(b"host", b"x")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": method, "path": path, "headers": headers}


def client(*chunks, stall: bool = False, disconnect: bool = False):
    """An ASGI receive: ``chunks`` of the body, then a stall (never more) or a disconnect."""
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    if not stall and not disconnect:
        messages[-1]["more_body"] = False

    async def receive():
        if messages:
            return messages.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(STALL)

    return receive


class Recorder:
    """An ASGI send that keeps the answer: status, headers, body."""

    def __init__(self):
        self.status, self.headers, self.body = None, {}, b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {bytes(k).decode().lower(): bytes(v).decode() for k, v in message.get("headers", ())}
        else:
            self.body += message.get("body", b"")

    def error(self) -> str:
        assert self.headers["content-type"] == "application/json"
        body = json.loads(self.body)
        assert list(body) == ["error"] and "\n" not in body["error"]
        return body["error"]


class Echo:
    """An app that answers 200 with the body it received, read the ASGI way."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_whole_body_reaches_the_app_as_one_message():
    app = Echo()
    out = Recorder()
    run(WholeBodies(app, LIMITS)(scope(length=10), client(b"01234", b"56789"), out))
    assert (out.status, out.body, app.calls) == (200, b"0123456789", 1)


def test_requests_without_a_body_pass_untouched():
    app = Echo()
    out = Recorder()
    run(WholeBodies(app, LIMITS)(scope("GET", None), client(b""), out))
    assert (out.status, app.calls) == (200, 1)


@pytest.mark.parametrize("length, chunks, message", [
    (10, [b"01234"], "body: expected 10 bytes within 0.2 s, got 5 bytes"),
    (None, [b"012"], "body: expected the whole body within 0.2 s, got 3 bytes"),  # chunked
])
def test_a_stalled_body_gets_408_and_the_connection_closes(length, chunks, message):
    app = Echo()
    out = Recorder()
    sc = scope(length=length)
    if length is None:
        sc["headers"].append((b"transfer-encoding", b"chunked"))
    run(WholeBodies(app, LIMITS)(sc, client(*chunks, stall=True), out))
    assert (out.status, out.error(), out.headers["connection"], app.calls) == (408, message, "close", 0)


@pytest.mark.parametrize("length, chunks, message", [
    (101, [b"x" * 101], "body: expected at most 100 bytes, got 101"),  # declared: refused before reading
    ("9" * 40, [b"x"], "body: expected at most 100 bytes, got more"),
    (50, [b"x" * 60, b"x" * 60], "body: expected at most 100 bytes, got 120"),  # more than declared
])
def test_a_body_over_the_limit_gets_413(length, chunks, message):
    app = Echo()
    out = Recorder()
    run(WholeBodies(app, LIMITS)(scope(length=length), client(*chunks), out))
    assert (out.status, out.error(), out.headers["connection"], app.calls) == (413, message, "close", 0)


def test_uploads_past_the_limit_get_503_at_once_and_a_freed_slot_is_reused():
    """Two stalled uploads hold both slots: a third is refused while they wait; once they time out, a
    fourth gets through."""
    app = Echo()
    guard = WholeBodies(app, LIMITS)

    async def scenario():
        stalled = [Recorder(), Recorder()]
        waiting = [asyncio.create_task(guard(scope(), client(b"0", stall=True), out)) for out in stalled]
        await asyncio.sleep(0.05)
        third = Recorder()
        await guard(scope(), client(b"0123456789"), third)
        assert not any(t.done() for t in waiting)  # the third was answered before either stalled one
        await asyncio.gather(*waiting)
        fourth = Recorder()
        await guard(scope(), client(b"0123456789"), fourth)
        return stalled, third, fourth

    stalled, third, fourth = run(scenario())
    assert [s.status for s in stalled] == [408, 408]
    assert (third.status, third.error()) == (503, "server busy: 2 request bodies arriving (limit 2), retry later")
    assert third.headers["connection"] == "close"
    assert (fourth.status, fourth.body, guard.receiving, app.calls) == (200, b"0123456789", 0, 1)


def test_a_client_that_leaves_mid_body_never_reaches_the_app():
    app = Echo()
    out = Recorder()
    run(WholeBodies(app, LIMITS)(scope(), client(b"01", disconnect=True), out))
    assert (out.status, app.calls) == (None, 0)


async def _no_answer(scope, receive, send):  # Serve's proxy when the Api replica died: it sends nothing
    return None


async def _raises(scope, receive, send):
    raise RuntimeError("boom\nsecond line")


async def _text_503(scope, receive, send):  # Serve's proxy's own backpressure answer
    await send({"type": "http.response.start", "status": 503,
                "headers": [[b"content-type", b"text/plain; charset=utf-8"], [b"retry-after", b"2"]]})
    await send({"type": "http.response.body", "body": b"Request dropped due to backpressure ", "more_body": True})
    await send({"type": "http.response.body", "body": b"(num_queued_requests=3).\nmore"})


@pytest.mark.parametrize("app, status, message", [
    (_no_answer, 500, NO_ANSWER),
    (_raises, 500, NO_ANSWER),
    (_text_503, 503, "Request dropped due to backpressure (num_queued_requests=3)."),
], ids=["no-answer", "raises", "text-503"])
def test_the_proxys_own_errors_become_one_line_of_json(app, status, message):
    out = Recorder()
    run(JsonErrors(app)(scope("GET", None), client(b""), out))
    assert (out.status, out.error()) == (status, message)
    assert int(out.headers["content-length"]) == len(out.body)
    if app is _text_503:
        assert out.headers["retry-after"] == "2"


@pytest.mark.parametrize("status, content_type, body", [
    (200, "text/plain", b"fine"),
    (200, "text/html", b"<p>page</p>"),
    (400, "application/json", b'{"error": "ours"}'),
])
def test_answers_that_are_not_proxy_errors_pass_unchanged(status, content_type, body):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode())]})
        await send({"type": "http.response.body", "body": body})

    out = Recorder()
    run(JsonErrors(app)(scope("GET", None), client(b""), out))
    assert (out.status, out.headers["content-type"], out.body) == (status, content_type, body)


def test_limits_travel_through_the_environment(monkeypatch):
    limits = Limits(body_timeout_s=1.5, max_uploads=7, max_body_bytes=1000)
    env = limits.environment()
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "clusca_trt.serve.proxy:middlewares"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert Limits.from_environment() == limits
    monkeypatch.delenv("CLUSCA_SERVE_LIMITS")
    assert Limits.from_environment() == Limits()


# -- the Api's own layer (where a proxy lacks WholeBodies) -----------------------------------------


def test_the_api_applies_the_same_limits_itself():
    pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'clusca-trt[serve]'")
    from starlette.requests import Request

    from clusca_trt.serve.app import Refused, Uploads

    uploads = Uploads(LIMITS)

    async def refusal(coro):
        with pytest.raises(Refused) as e:
            await coro
        return e.value.status, str(e.value), e.value.close

    async def scenario():
        whole = await uploads.read(Request(scope(length=10), client(b"01234", b"56789")))
        held = [asyncio.create_task(refusal(uploads.read(Request(scope(), client(b"0", stall=True)))))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        busy = await refusal(uploads.read(Request(scope(), client(b"0123456789"))))
        timed_out = await asyncio.gather(*held)
        large = await refusal(uploads.read(Request(scope(length=101), client(b"x"))))
        return whole, busy, timed_out, large

    whole, busy, timed_out, large = run(scenario())
    assert whole == b"0123456789"
    assert busy == (503, "server busy: 2 request bodies arriving (limit 2), retry later", True)
    assert timed_out == [(408, "body: expected 10 bytes within 0.2 s, got 1 bytes", True)] * 2
    assert large == (413, "body: expected at most 100 bytes, got 101", True)
    assert uploads.receiving == 0
