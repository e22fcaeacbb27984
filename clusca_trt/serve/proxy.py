"""What Serve's HTTP proxy runs of ours, in front of every request: ``WholeBodies`` (slow clients) and
``JsonErrors`` (every error answer one line of JSON), and the one-line messages the ``Api`` shares.

    WholeBodies   a request reaches Serve (and a slot of our Api) only with its whole body: received
                  within body_timeout_s (else 408), at most max_body_bytes (else 413), at most max_uploads
                  bodies at once per proxy (else 503 at once); a refusal closes the connection. A stalled
                  upload costs the proxy one coroutine until its timeout, nothing else.
    JsonErrors    answers the proxy makes without our Api become {"error": "<one line>"}:
                    the Api replica died mid-request (no answer; uvicorn  ->  500 JSON
                    would say "Internal Server Error", text/plain)
                    408 / 429 / 503 text/plain (Serve's timeout,          ->  the same status, JSON
                    backpressure, an application not running)

Serve wraps its proxy's app in the middlewares that a callback returns: the callback's import path is
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in the proxy's environment. ``server.py`` puts it (and
``LIMITS_ENV``, the limits as JSON) into the Serve controller's environment, which the proxies it
starts inherit; on a cluster whose Serve already runs, start Serve again (``serve shutdown``) for them
to apply. The ``Api`` checks the same limits itself (a proxy without these middlewares).

The proxy imports this module: it imports nothing heavy (no torch; Starlette when Serve asks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass

from ..errors import one_line

log = logging.getLogger(__name__)

CALLBACK = "clusca_trt.serve.proxy:middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMITS_ENV = "CLUSCA_SERVE_LIMITS"
NO_ANSWER = "the server's API replica failed while answering (Serve restarts it); retry"


@dataclass(frozen=True)
class Limits:
    """How long and how large request bodies may be, and how many may arrive at once (``ServeOptions``
    checks the values; these are its defaults)."""

    body_timeout_s: float = 5.0
    max_uploads: int = 1024
    max_body_bytes: int = 64 * 2**20

    def environment(self) -> dict[str, str]:
        """The proxy's environment variables that install the middlewares with these limits."""
        return {CALLBACK_ENV: CALLBACK, LIMITS_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_environment(cls) -> "Limits":
        return cls(**json.loads(os.environ[LIMITS_ENV])) if os.environ.get(LIMITS_ENV) else cls()


def too_large(limit: int, got) -> str:
    return f"body: expected at most {limit} bytes, got {got}"


def too_slow(length: str, timeout_s: float, got: int) -> str:
    expected = f"{length} bytes" if length.isdigit() and len(length) <= 18 else "the whole body"
    return f"body: expected {expected} within {timeout_s:g} s, got {got} bytes"


def too_many(receiving: int, limit: int) -> str:
    return f"server busy: {receiving} request bodies arriving (limit {limit}), retry later"


def declared_length(scope_or_headers) -> tuple[str, int | None]:
    """The Content-Length header as sent and as a number (None: absent, not digits, or over 18 digits)."""
    headers = scope_or_headers["headers"] if isinstance(scope_or_headers, dict) else scope_or_headers
    for name, value in headers:
        if bytes(name).lower() == b"content-length":
            text = bytes(value).decode("latin-1").strip()
            return text, int(text) if text.isdigit() and len(text) <= 18 else None
    return "", None


def error_body(message: object) -> dict:
    """Every error answer's JSON: ``{"error": "<one line>"}``."""
    return {"error": one_line(message)}


def middlewares() -> list:
    """The callback Serve's proxy calls (``CALLBACK``): the middlewares it wraps its app in (the last
    outermost), with the limits of ``LIMITS_ENV``."""
    from starlette.middleware import Middleware

    return [Middleware(WholeBodies, limits=Limits.from_environment()), Middleware(JsonErrors)]


class WholeBodies:
    """Pure ASGI middleware: an HTTP request that has a body reaches the app with all of it at once,
    or is refused (see the module); the app's later ``receive`` calls go to the client's (disconnects)."""

    def __init__(self, app, limits: Limits | None = None):
        self.app = app
        self.limits = limits or Limits()
        self.receiving = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        lim = self.limits
        length, size = declared_length(scope)
        if self.receiving >= lim.max_uploads:  # at once: a slow client must not make others wait
            await _send_error(send, 503, too_many(self.receiving, lim.max_uploads), close=True)
            return
        if length and (size is None and length.isdigit() or size is not None and size > lim.max_body_bytes):
            await _send_error(send, 413, too_large(lim.max_body_bytes, length if size is not None else "more"),
                              close=True)
            return
        chunks, got = [], 0

        async def read() -> bool:
            nonlocal got
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                chunks.append(message.get("body", b""))
                got += len(chunks[-1])
                if got > lim.max_body_bytes:
                    raise _TooLarge
                if not message.get("more_body", False):
                    return True

        self.receiving += 1
        try:
            complete = await asyncio.wait_for(read(), lim.body_timeout_s)
        except asyncio.TimeoutError:
            await _send_error(send, 408, too_slow(length, lim.body_timeout_s, got), close=True)
            return
        except _TooLarge:
            await _send_error(send, 413, too_large(lim.max_body_bytes, got), close=True)
            return
        finally:
            self.receiving -= 1
        if not complete:  # the client went away
            return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _TooLarge(Exception):
    pass


def _has_body(scope) -> bool:
    for name, value in scope.get("headers", ()):
        name = bytes(name).lower()
        if name == b"transfer-encoding" or name == b"content-length" and bytes(value).strip() not in (b"", b"0"):
            return True
    return False


class JsonErrors:
    """Pure ASGI middleware: a non-JSON error answer becomes ``{"error": "<its first line>"}`` with the
    same status and headers; an app that returns (or raises) without answering gets a JSON 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, held, body = False, None, []

        async def rewrite(message):
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400 and not _content_type(message).startswith(b"application/json"):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await _send_error(send, held["status"], b"".join(body).decode("utf-8", "replace"),
                                      [h for h in held.get("headers", ()) if _keep(h)])
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as e:
            if started:
                raise
            log.warning("request failed without an answer: %s: %s", type(e).__name__, one_line(e))
            await _send_error(send, 500, NO_ANSWER)
            return
        if not started:
            await _send_error(send, 500, NO_ANSWER)


def _content_type(message) -> bytes:
    for name, value in message.get("headers", ()):
        if bytes(name).lower() == b"content-type":
            return bytes(value).lower()
    return b""


def _keep(header) -> bool:
    return bytes(header[0]).lower() not in (b"content-type", b"content-length")


async def _send_error(send, status: int, message: str, headers=(), close: bool = False) -> None:
    """``{"error": message}`` with ``status``; ``close``: and the connection is closed after it."""
    body = json.dumps(error_body(message or f"HTTP {status}")).encode()
    extra = [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers, *extra]})
    await send({"type": "http.response.body", "body": body})
