"""The Ray Serve application of ``clusca-trt serve``: an ``Api`` ingress in front of ``Engine`` replicas.

    HTTP -> Serve's proxy -> Api (one replica, no CPU reserved)  -- DeploymentHandle -->  Engine (R replicas)
              GET / (the page), GET /health, GET /info,              a queue per settings key, one engine
              POST /generate, POST /compare                          run per batch (worker.Batcher)
              receive (503, 408, 413), validate (400),
              admit (503), map errors (500)

Why two deployments: errors the proxy makes itself (its own backpressure, a replica that died) are
plain text; the ``Api`` catches them on its handle call and answers ``{"error": "<one line>"}``, and
it stays up while engine replicas restart. Admission is an exact count of the requests in flight in
the one ``Api`` replica (Serve's ``max_queued_requests`` is approximate under bursts): at most
``replicas x max_ongoing + max_queue``; more get 503 at once. A request whose replica dies is sent
again (generation is deterministic, so a retry gives the same answer).

Slow clients, two layers with the same ``Limits``: Serve's proxy runs ``proxy.WholeBodies`` (where
``server.py`` started Serve), so a request reaches the ``Api`` only with its whole body, received within
``body_timeout_s`` (else 408), with at most ``max_uploads`` bodies arriving at once (more: 503 at once);
a stalled upload never holds a slot of the ``Api``. Where a proxy lacks it, the ``Api`` applies the same
limits itself (``Uploads``), and Serve's limit on the ``Api`` (``max_ongoing_requests``) is uploads +
admitted requests + ``CONTROL_SLOTS``, so stalled uploads never hold the slots /health and /info need.
Errors the proxy makes itself become one line of JSON too (``proxy.JsonErrors``).

No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at
import time (as strings it would take ``request: Request`` for a query parameter).
"""

import asyncio
import base64
import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from ..engines.inspect import describe
from ..engines.manifest import Manifest, find_build
from ..errors import ConfigError, InputError, one_line
from ..runtime.compare import method_label, psnr
from ..runtime.output import png_bytes
from .protocol import (GenerateRequest, ModelInfo, page_form, parse_compare, parse_request,
                       warmup_requests)
from .proxy import Limits, declared_length, error_body, too_large, too_many, too_slow
from .worker import Batcher, EngineWorker, Reply

log = logging.getLogger(__name__)

APP_NAME = "clusca-trt"
API, ENGINE = "Api", "Engine"
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)
LARGE_BODY = 2**16  # bytes
CONTROL_SLOTS = 256  # Api requests beyond uploads and admitted ones: GET /, /health, /info


@dataclass(frozen=True)
class EngineSettings:
    """What an ``Engine`` replica is built with (pickled to every replica: paths and numbers only)."""

    engine_dir: str
    provider: str = "auto"
    backend: str = "onnxruntime"
    threads: int | None = None
    batch_wait_s: float = 0.01
    fault_seed: int | None = None  # tests only: see EngineWorker


@dataclass(frozen=True)
class ApiSettings:
    engine_dir: str
    limit: int  # requests in flight at most (running + queued); more: 503
    limits: Limits  # of request bodies: size, time, how many at once
    max_request_samples: int
    retries: int
    summary: dict  # the serving options, for GET /info


@serve.deployment(name=ENGINE, health_check_period_s=2.0, health_check_timeout_s=30.0,
                  graceful_shutdown_timeout_s=5.0, graceful_shutdown_wait_loop_s=0.5)
class Engine:
    """One replica: the engines loaded from the path (sessions cannot be pickled) and their batcher."""

    def __init__(self, settings: EngineSettings):
        self.worker = EngineWorker.load(settings.engine_dir, settings.provider, settings.backend, settings.threads,
                                        settings.fault_seed)
        for request in warmup_requests(ModelInfo.from_manifest(self.worker.pipe.manifest)):
            self.worker.run([request])  # every graph called once before the first answer is timed
        self.batcher = Batcher(self.worker.run_async, self.worker.batch, settings.batch_wait_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        log.info("replica %s: engines of %s on %s", self.replica, settings.engine_dir, self.worker.pipe.engine.info)

    async def generate(self, request: GenerateRequest) -> Reply:
        reply = await self.batcher.submit(request)
        return dataclasses.replace(reply, meta=dict(reply.meta, replica=self.replica))


api = FastAPI(title="clusca-trt", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message) -> JSONResponse:
    return JSONResponse(error_body(message), status_code=status)


@api.exception_handler(HTTPException)  # 404, 405 from routing: the same one-line JSON
async def _http_error(request: Request, exc: HTTPException):
    return _error(exc.status_code, exc.detail)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error")
    return _error(500, f"{type(exc).__name__}: {one_line(exc)}")


class Refused(Exception):
    """A request answered with an error before it reaches an engine: ``status``, one-line ``message``,
    the ``Api.stats`` counter it adds to; ``close``: its body may still be arriving, so the connection
    closes after the answer."""

    def __init__(self, status: int, message: object, counter: str, close: bool = False):
        super().__init__(one_line(message))
        self.status, self.counter, self.close = status, counter, close


class Uploads:
    """The ``Api``'s own limits on request bodies (``Limits``; behind ``proxy.WholeBodies`` a body
    arrives whole, so these matter where a proxy lacks it): at most ``max_uploads`` received at once
    (more: 503 at once), each whole within ``body_timeout_s`` (408) and ``max_body_bytes`` (413)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.receiving = 0

    async def read(self, request: Request) -> bytes:
        lim = self.limits
        if self.receiving >= lim.max_uploads:  # at once: a slow client must not make others wait
            raise Refused(503, too_many(self.receiving, lim.max_uploads), "busy", True)
        length, declared = declared_length(request.scope)
        if length.isdigit() and (declared is None or declared > lim.max_body_bytes):
            raise Refused(413, too_large(lim.max_body_bytes, length if declared is not None else "more"),
                          "bad_request", True)
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > lim.max_body_bytes:
                    raise Refused(413, too_large(lim.max_body_bytes, size), "bad_request", True)
                chunks.append(chunk)

        self.receiving += 1
        try:
            await asyncio.wait_for(read(), lim.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, too_slow(length, lim.body_timeout_s, size), "body_timeout", True) from None
        finally:
            self.receiving -= 1
        return b"".join(chunks)


def _comparison(requests: list[GenerateRequest], replies: list[Reply]) -> dict:
    """POST /compare's answer: per method its label, engine seconds, speed-up and PSNR vs full (the
    first), the batch it ran in and its images as one PNG (a data URL)."""
    images = [np.load(io.BytesIO(reply.body))["images"] for reply in replies]
    full_seconds = replies[0].meta["engine_seconds"]
    rows = []
    for request, reply, imgs in zip(requests, replies, images):
        seconds = reply.meta["engine_seconds"]
        quality = psnr(imgs, images[0])
        rows.append({
            "method": request.config.method.value,
            "label": method_label(request.config),
            "engine_seconds": seconds,
            "speedup": round(full_seconds / seconds, 4) if seconds > 0 else None,
            "psnr_db": round(quality, 3) if math.isfinite(quality) else None,  # None: equal to full's
            "batch_requests": reply.meta["batch_requests"],
            "image": "data:image/png;base64," + base64.b64encode(png_bytes(imgs)).decode(),
        })
    first = requests[0]
    return {"seed": first.seed, "steps": first.steps, "samples": first.samples, "methods": rows}


@serve.deployment(name=API, num_replicas=1, ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5.0,
                  graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class Api:
    def __init__(self, engine, settings: ApiSettings):
        manifest = Manifest.read(find_build(Path(settings.engine_dir)))
        self.model = ModelInfo.from_manifest(manifest)
        self.description = describe(manifest)
        self.form = page_form(self.model)
        self.page = (resources.files(__package__) / "page.html").read_text(encoding="utf-8")
        self.engine = engine  # a DeploymentHandle to the Engine replicas
        self.settings = settings
        self.in_flight = 0  # admitted requests (running or queued for an engine)
        self.uploads = Uploads(settings.limits)
        self.stats = {"requests": 0, "ok": 0, "bad_request": 0, "busy": 0, "body_timeout": 0, "failed": 0,
                      "retried": 0, "compares": 0, "shared_run_responses": 0, "largest_batch_requests": 0,
                      "largest_batch_samples": 0}

    @api.get("/")
    async def page(self):
        return HTMLResponse(self.page)

    @api.get("/health")
    async def health(self):
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(APP_NAME)
        deployment = app.deployments.get(ENGINE) if app else None
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        wanted = self.settings.summary["replicas"]
        if not running:
            return _error(503, f"no engine replica ready (0 of {wanted} running)")
        return {"status": "ok", "replicas_running": running, "replicas": wanted}

    @api.get("/info")
    async def info(self):
        return {"engine": self.description, "serve": self.settings.summary, "in_flight": self.in_flight,
                "receiving": self.uploads.receiving, "stats": dict(self.stats), "form": self.form}

    async def _receive(self, request: Request, parse):
        """The body received and parsed by ``parse(raw, model, max_samples)``, then admitted; or ``Refused``."""
        s = self.settings
        raw = await self.uploads.read(request)
        try:
            if len(raw) > LARGE_BODY:  # FLUX embeddings: parse off the event loop that answers everyone
                parsed = await asyncio.to_thread(parse, raw, self.model, s.max_request_samples)
            else:
                parsed = parse(raw, self.model, s.max_request_samples)
        except (InputError, ConfigError) as e:
            raise Refused(400, e, "bad_request") from None
        if self.in_flight >= s.limit:  # no await between this check and the caller's increment
            raise Refused(503, f"server busy: {self.in_flight} requests in flight (limit {s.limit}), retry later",
                          "busy")
        return parsed

    def _refused(self, e: Refused) -> JSONResponse:
        self.stats[e.counter] += 1
        response = _error(e.status, e)
        if e.close:
            response.headers["Connection"] = "close"
        return response

    def _failed(self, reply: Reply) -> JSONResponse:
        self.stats["bad_request" if reply.status == 400 else "failed"] += 1
        response = _error(reply.status, reply.error)
        if "replica" in reply.meta:
            response.headers["X-Replica"] = reply.meta["replica"]
        return response

    @api.post("/generate")
    async def generate(self, request: Request):
        self.stats["requests"] += 1
        try:
            parsed = await self._receive(request, parse_request)
        except Refused as e:
            return self._refused(e)
        self.in_flight += 1
        try:
            reply = await self._call_engine(parsed)
        finally:
            self.in_flight -= 1
        if reply.status != 200:
            return self._failed(reply)
        self.stats["ok"] += 1
        meta = reply.meta
        if meta["batch_requests"] > 1:
            self.stats["shared_run_responses"] += 1
        self.stats["largest_batch_requests"] = max(self.stats["largest_batch_requests"], meta["batch_requests"])
        self.stats["largest_batch_samples"] = max(self.stats["largest_batch_samples"], meta["batch_samples"])
        headers = {"X-Batch-Requests": str(meta["batch_requests"]), "X-Batch-Samples": str(meta["batch_samples"]),
                   "X-Engine-Seconds": str(meta["engine_seconds"]), "X-Replica": meta["replica"]}
        return Response(reply.body, media_type=reply.media_type, headers=headers)

    @api.post("/compare")
    async def compare(self, request: Request):
        """The same inputs and seed through every method the build runs, one after another (full first):
        each one's engine seconds, speed-up and PSNR vs full, and images. One admitted request."""
        self.stats["compares"] += 1
        try:
            runs = await self._receive(request, parse_compare)
        except Refused as e:
            return self._refused(e)
        self.in_flight += 1
        try:
            replies = []
            for run in runs:
                reply = await self._call_engine(run)
                if reply.status != 200:
                    return self._failed(reply)
                replies.append(reply)
        finally:
            self.in_flight -= 1
        return await asyncio.to_thread(_comparison, runs, replies)

    async def _call_engine(self, request: GenerateRequest) -> Reply:
        """The engine's reply; an engine replica that died is asked again (up to ``retries`` times)."""
        for attempt in range(self.settings.retries + 1):
            try:
                return await self.engine.generate.remote(request)
            except ray.exceptions.RayActorError as e:
                if attempt == self.settings.retries:
                    return Reply(500, error=f"engine replica died ({type(e).__name__}), {attempt} retries failed")
                self.stats["retried"] += 1
                log.warning("engine replica died (%s); retrying the request", type(e).__name__)
                await asyncio.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
            except BackPressureError as e:
                return Reply(503, error=one_line(e))
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                return Reply(500, error=f"engine failed: {type(cause).__name__}: {one_line(cause)}")


def build_app(engine: EngineSettings, api_settings: ApiSettings, replicas: int, max_ongoing: int,
              ray_actor_options: dict):
    """The bound application: ``Api`` over ``Engine`` x ``replicas``."""
    engines = Engine.options(num_replicas=replicas, max_ongoing_requests=max_ongoing, max_queued_requests=-1,
                             ray_actor_options=ray_actor_options)
    slots = api_settings.limit + api_settings.limits.max_uploads + CONTROL_SLOTS
    return Api.options(max_ongoing_requests=slots).bind(engines.bind(engine), api_settings)
