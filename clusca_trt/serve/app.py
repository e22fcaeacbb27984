"""The Ray Serve application of ``clusca-trt serve``: an ``Api`` ingress in front of ``Engine`` replicas.

    HTTP -> Serve's proxy -> Api (one replica, no CPU reserved)  -- DeploymentHandle -->  Engine (R replicas)
              GET /health, GET /info, POST /generate                 a queue per settings key, one engine
              validate (400), admit (503), map errors (500)           run per batch (worker.Batcher)

Why two deployments: errors the proxy makes itself (its own backpressure, a replica that died) are
plain text; the ``Api`` catches them on its handle call and answers ``{"error": "<one line>"}``, and
it stays up while engine replicas restart. Admission is an exact count of the requests in flight in
the one ``Api`` replica (Serve's ``max_queued_requests`` is approximate under bursts): at most
``replicas x max_ongoing + max_queue``; more get 503 at once. A request whose replica dies is sent
again (generation is deterministic, so a retry gives the same answer).

No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at
import time (as strings it would take ``request: Request`` for a query parameter).
"""

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from ..engines.inspect import describe
from ..engines.manifest import Manifest, find_build
from ..errors import ConfigError, InputError
from .protocol import GenerateRequest, ModelInfo, error_body, one_line, parse_request
from .worker import Batcher, EngineWorker, Reply

log = logging.getLogger(__name__)

APP_NAME = "clusca-trt"
API, ENGINE = "Api", "Engine"
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)
LARGE_BODY = 2**16  # bytes


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
    max_body_bytes: int
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


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(int(length))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name=API, num_replicas=1, ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5.0,
                  graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class Api:
    def __init__(self, engine, settings: ApiSettings):
        manifest = Manifest.read(find_build(Path(settings.engine_dir)))
        self.model = ModelInfo.from_manifest(manifest)
        self.description = describe(manifest)
        self.engine = engine  # a DeploymentHandle to the Engine replicas
        self.settings = settings
        self.in_flight = 0
        self.stats = {"requests": 0, "ok": 0, "bad_request": 0, "busy": 0, "failed": 0, "retried": 0,
                      "shared_run_responses": 0, "largest_batch_requests": 0, "largest_batch_samples": 0}

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
                "stats": dict(self.stats)}

    @api.post("/generate")
    async def generate(self, request: Request):
        self.stats["requests"] += 1
        try:
            raw = await _read_body(request, self.settings.max_body_bytes)
        except BodyTooLarge as e:
            self.stats["bad_request"] += 1
            return _error(413, f"body: expected at most {self.settings.max_body_bytes} bytes, got {e.args[0]}")
        try:
            if len(raw) > LARGE_BODY:  # FLUX embeddings: parse off the event loop that answers everyone
                parsed = await asyncio.to_thread(parse_request, raw, self.model, self.settings.max_request_samples)
            else:
                parsed = parse_request(raw, self.model, self.settings.max_request_samples)
        except (InputError, ConfigError) as e:
            self.stats["bad_request"] += 1
            return _error(400, e)
        if self.in_flight >= self.settings.limit:  # no await between this check and the increment
            self.stats["busy"] += 1
            return _error(503, f"server busy: {self.in_flight} requests in flight (limit {self.settings.limit}), "
                               "retry later")
        self.in_flight += 1
        try:
            reply = await self._call_engine(parsed)
        finally:
            self.in_flight -= 1
        if reply.status != 200:
            self.stats["bad_request" if reply.status == 400 else "failed"] += 1
            response = _error(reply.status, reply.error)
            if "replica" in reply.meta:
                response.headers["X-Replica"] = reply.meta["replica"]
            return response
        self.stats["ok"] += 1
        meta = reply.meta
        if meta["batch_requests"] > 1:
            self.stats["shared_run_responses"] += 1
        self.stats["largest_batch_requests"] = max(self.stats["largest_batch_requests"], meta["batch_requests"])
        self.stats["largest_batch_samples"] = max(self.stats["largest_batch_samples"], meta["batch_samples"])
        headers = {"X-Batch-Requests": str(meta["batch_requests"]), "X-Batch-Samples": str(meta["batch_samples"]),
                   "X-Engine-Seconds": str(meta["engine_seconds"]), "X-Replica": meta["replica"]}
        return Response(reply.body, media_type=reply.media_type, headers=headers)

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
    return Api.options(max_ongoing_requests=api_settings.limit + 256).bind(engines.bind(engine), api_settings)
