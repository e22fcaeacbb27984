"""One engine replica's work, without Ray: a ``Pipeline`` run by one thread; a batch of compatible
requests in, one ``Reply`` per request out; and the ``Batcher`` that forms the batches.

    worker = EngineWorker.load("engines/dit", threads=2)
    replies = worker.run([request_a, request_b])          # one engine run, split back per request
    batcher = Batcher(worker.run_async, max_samples=worker.batch, window_s=0.01)
    reply = await batcher.submit(request)                 # from many tasks at once

Every run goes through the worker's single thread, so one replica never mixes two runs' engine state,
whatever the ``Pipeline`` itself guarantees. A batch that fails is run again request by request: one
bad request cannot fail the requests that shared its run, and each answer says whose fault it was
(an input error: 400; anything else: 500).

Batches form when the engine is free, not before: requests wait in one queue per settings key while a
run is in progress, and the next run takes the key whose oldest request waited longest, with as many
of its requests as fit ``max_samples``. Only an idle engine waits (up to ``window_s`` after the oldest
request arrived) for company. (Serve's ``@serve.batch`` closes a batch after its wait window whether
or not the engine is free, and queues closed batches: under load it ran batches of 2 requests where
8 were waiting.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..errors import ConfigError, InputError
from ..runtime.output import result_bytes
from ..runtime.pipeline import GenerateResult, Pipeline
from ..errors import one_line
from .protocol import MEDIA_TYPES, GenerateRequest, batch_arguments

log = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """An engine run that failed for a reason other than its inputs."""


@dataclass(frozen=True)
class Reply:
    """One request's answer: ``status`` 200 with ``body`` (npz or png bytes), or an error status with
    a one-line ``error``. ``meta``: the engine run it came from (requests, samples, seconds)."""

    status: int
    body: bytes = b""
    media_type: str = "application/json"
    error: str | None = None
    meta: dict = field(default_factory=dict)


class EngineWorker:
    """A ``Pipeline`` and the one thread that runs it. ``fault_seed`` (tests only): a run holding a
    request with this seed fails as a broken engine would."""

    def __init__(self, pipe: Pipeline, fault_seed: int | None = None):
        self.pipe = pipe
        self.batch = pipe.spec.options.batch
        self.fault_seed = fault_seed
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clusca-engine")

    @classmethod
    def load(cls, engine_dir: str, provider: str = "auto", backend: str = "onnxruntime", threads: int | None = None,
             fault_seed: int | None = None) -> "EngineWorker":
        """Open the engines (the server verified the files' hashes once, before deploying)."""
        pipe = Pipeline.load(engine_dir, provider=provider, backend=backend, threads=threads, verify=False)
        return cls(pipe, fault_seed)

    async def run_async(self, requests: list[GenerateRequest]) -> list[Reply]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.run, requests)

    def run(self, requests: list[GenerateRequest]) -> list[Reply]:
        """One engine run of ``requests`` (one batching key); blocks. Never raises: failures are replies."""
        try:
            result = self._generate(requests)
        except Exception as e:  # an engine failure becomes a 500 reply; the replica keeps serving
            if len(requests) > 1:
                log.warning("a run of %d requests failed (%s); running each alone", len(requests), one_line(e))
                return [self.run([r])[0] for r in requests]
            if isinstance(e, (InputError, ConfigError)):
                return [Reply(400, error=one_line(e))]
            log.error("engine run failed: %s: %s", type(e).__name__, one_line(e))
            return [Reply(500, error=f"engine run failed: {type(e).__name__}: {one_line(e)}")]
        return self._split(requests, result)

    def _generate(self, requests: list[GenerateRequest]) -> GenerateResult:
        if self.fault_seed is not None and any(r.seed == self.fault_seed for r in requests):
            raise EngineFailure(f"injected engine failure (a request with seed {self.fault_seed})")
        return self.pipe.generate(**batch_arguments(requests))

    def _split(self, requests: list[GenerateRequest], result: GenerateResult) -> list[Reply]:
        total = sum(r.samples for r in requests)
        meta = {"batch_requests": len(requests), "batch_samples": total, "chunks": math.ceil(total / self.batch),
                "engine_seconds": round(result.seconds, 6)}
        log.info("ran %d requests (%d samples, %d chunks) in %.3f s", len(requests), total, meta["chunks"],
                 result.seconds)
        replies, start = [], 0
        for r in requests:
            rows = slice(start, start + r.samples)
            start += r.samples
            own = dataclasses.replace(
                result,
                latents=result.latents[rows],
                labels=None if result.labels is None else result.labels[rows],
                images=None if result.images is None else result.images[rows],
            )
            t0 = time.perf_counter()
            body = result_bytes(own, r.format)
            replies.append(Reply(200, body, MEDIA_TYPES[r.format],
                                 meta=dict(meta, encode_seconds=round(time.perf_counter() - t0, 6))))
        return replies

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.pipe.close()


class Batcher:
    """Dynamic batching of ``GenerateRequest``s into runs of ``run`` (one at a time; see the module)."""

    def __init__(self, run: Callable[[list[GenerateRequest]], Awaitable[list[Reply]]], max_samples: int,
                 window_s: float):
        self.run, self.max_samples, self.window_s = run, max_samples, window_s
        self._queues: OrderedDict[tuple, deque] = OrderedDict()  # key -> (arrival, request, future)
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def submit(self, request: GenerateRequest) -> Reply:
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(request.key, deque()).append((time.monotonic(), request, future))
        self._arrived.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._queues:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            key = min(self._queues, key=lambda k: self._queues[k][0][0])  # the longest waiting request's
            deadline = self._queues[key][0][0] + self.window_s
            while self._samples(key) < self.max_samples and time.monotonic() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    pass
                self._drop_cancelled()
                if key not in self._queues:
                    break
            if key not in self._queues:
                continue
            batch = self._take(key)
            try:
                replies = await self.run([request for _, request, _ in batch])
            except Exception as e:  # run answers failures as replies; this is a bug, still answered
                replies = [Reply(500, error=f"batch failed: {type(e).__name__}: {one_line(e)}")] * len(batch)
            for (_, _, future), reply in zip(batch, replies):
                if not future.done():
                    future.set_result(reply)

    def _samples(self, key: tuple) -> int:
        return sum(request.samples for _, request, _ in self._queues.get(key, ()))

    def _take(self, key: tuple) -> list:
        """The oldest requests of ``key`` that fit ``max_samples`` (at least one)."""
        queue, batch, samples = self._queues[key], [], 0
        while queue and (not batch or samples + queue[0][1].samples <= self.max_samples):
            item = queue.popleft()
            batch.append(item)
            samples += item[1].samples
        if not queue:
            del self._queues[key]
        return batch

    def _drop_cancelled(self) -> None:
        """Forget requests whose callers went away (a client that disconnected)."""
        for key in list(self._queues):
            queue = deque(item for item in self._queues[key] if not item[2].done())
            if queue:
                self._queues[key] = queue
            else:
                del self._queues[key]
