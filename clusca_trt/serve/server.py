"""Run ``clusca-trt serve``: check the engine directory, start Ray (a local instance, or join a
cluster), deploy the application (``app.py``), serve until Ctrl-C or SIGTERM, shut down.

    with Server(ServeOptions("engines/dit", port=8000)) as server:   # returns when every replica is ready
        server.url                                                   # http://127.0.0.1:8000
    serve_forever(options, ready=print)                              # the CLI: blocks until Ctrl-C

Local (no ``address``): a private Ray instance (``address="local"``: never one found in the
environment), no dashboard, token auth off, quiet logs; Ray's CPUs are what the replicas reserve.
Joined (``address``): replicas spread over the cluster's nodes, each reserving its threads' CPUs and
``gpus_per_replica`` GPUs (default 1 for a GPU provider or backend: one replica per GPU); the engine
directory must be at the same path on every node. Stopping a joined server deletes only its application.
An ``address`` where nothing listens is refused after ``CONNECT_WAIT_S`` (Ray itself retries forever).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..engines.manifest import Manifest, find_build
from ..errors import ConfigError, EngineError
from ..errors import one_line
from .protocol import ModelInfo
from .proxy import Limits

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
CONNECT_WAIT_S = 10.0  # how long --address may not answer before we give up
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


@dataclass(frozen=True)
class ServeOptions:
    """How to serve ENGINE_DIR. ``max_queue``: requests admitted beyond those the replicas hold
    (``max_ongoing`` each, default twice the engine batch); more get 503. ``threads``: ONNX Runtime
    threads per replica (local default: the cores shared out). ``body_timeout_s``: a request body
    arrives within this or gets 408; ``max_uploads``: bodies received at once, more get 503.
    ``fault_seed``: tests only."""

    engine_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port
    replicas: int = 1
    max_batch_wait_ms: float = 10.0
    max_queue: int = 64
    address: str | None = None
    threads: int | None = None
    provider: str = "auto"
    backend: str = "onnxruntime"
    gpus_per_replica: float | None = None
    max_ongoing: int | None = None
    max_request_samples: int = 64
    max_body_mb: float = 64.0
    body_timeout_s: float = Limits.body_timeout_s
    max_uploads: int = Limits.max_uploads
    retries: int = 3
    fault_seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_dir", Path(self.engine_dir))
        checks = [
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}"),
            (self.max_batch_wait_ms >= 0, f"max batch wait must be >= 0 ms, got {self.max_batch_wait_ms}"),
            (self.max_queue >= 0, f"max queue must be >= 0, got {self.max_queue}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.provider in PROVIDERS, f"provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}"),
            (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
            (self.gpus_per_replica is None or self.gpus_per_replica >= 0,
             f"GPUs per replica must be >= 0, got {self.gpus_per_replica}"),
            (self.max_ongoing is None or self.max_ongoing >= 1, f"max ongoing must be >= 1, got {self.max_ongoing}"),
            (self.max_request_samples >= 1, f"max request samples must be >= 1, got {self.max_request_samples}"),
            (self.max_body_mb > 0, f"max body must be > 0 MB, got {self.max_body_mb}"),
            (self.body_timeout_s > 0, f"body timeout must be > 0 s, got {self.body_timeout_s}"),
            (self.max_uploads >= 1, f"max uploads must be >= 1, got {self.max_uploads}"),
            (self.retries >= 0, f"retries must be >= 0, got {self.retries}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class Server:
    """A running server: Ray (local or joined), Serve's HTTP proxy and the application."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.port = options.port
        self._ray = self._serve = False

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    @property
    def local(self) -> bool:
        return self.options.address is None

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Check, start Ray, deploy; returns once every replica is ready. Cleans up after a failure."""
        o = self.options
        manifest = Manifest.read(find_build(o.engine_dir))
        manifest.verify(hashes=True)  # once here; the replicas open the verified files without hashing
        model = ModelInfo.from_manifest(manifest)
        if self.local:
            self.port = o.port or _free_port(o.host)
            _check_port(o.host, self.port)
        threads = o.threads or (max(1, (os.cpu_count() or 1) // o.replicas) if self.local else None)
        gpus = self._gpus_per_replica()
        try:
            self._start_ray(threads, gpus)
            self._deploy(manifest, model, threads, gpus)
        except BaseException:
            self.stop()
            raise

    def _gpus_per_replica(self) -> float:
        o = self.options
        if o.gpus_per_replica is not None:
            return o.gpus_per_replica
        if o.backend == "openvino":  # OpenVINO's CPU plugin
            return 0.0
        if o.backend == "tensorrt" or o.provider in ("cuda", "tensorrt"):
            return 1.0
        if o.provider == "auto" and self.local:
            from ..engines.ort import probe_providers

            return 1.0 if {"cuda", "tensorrt"} & set(probe_providers()) else 0.0
        return 0.0

    def _start_ray(self, threads: int | None, gpus: float) -> None:
        o = self.options
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # Serve's own logs to the session's files only
        if self.local:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance: no token file written
        else:
            _check_address(o.address)
        import ray

        cpus = o.replicas * (threads or 1)
        if self.local:
            log.info("starting a local Ray instance (%d CPUs)", max(os.cpu_count() or 1, cpus))
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
        else:
            log.info("joining the Ray cluster at %s", o.address)
            ray.init(address=o.address, log_to_driver=False, logging_level=logging.WARNING)
        self._ray = True
        have = ray.cluster_resources().get("GPU", 0)
        if gpus and o.replicas * gpus > have:
            raise ConfigError(f"{o.replicas} replicas x {gpus:g} GPUs need {o.replicas * gpus:g} GPUs, the Ray "
                              f"cluster has {have:g}; use fewer --replicas or --gpus-per-replica")

    def _deploy(self, manifest: Manifest, model: ModelInfo, threads: int | None, gpus: float) -> None:
        from ray import serve

        from .app import APP_NAME, ApiSettings, EngineSettings, build_app

        o = self.options
        max_ongoing = o.max_ongoing or 2 * model.batch  # one run in the engine while the next batch fills
        limit = o.replicas * max_ongoing + o.max_queue
        summary = {
            "replicas": o.replicas, "engine_batch": model.batch, "max_batch_samples": model.batch,
            "max_batch_wait_ms": o.max_batch_wait_ms, "max_ongoing_per_replica": max_ongoing,
            "max_queue": o.max_queue, "admission_limit": limit, "max_request_samples": o.max_request_samples,
            "body_timeout_s": o.body_timeout_s, "max_uploads": o.max_uploads,
            "threads_per_replica": threads, "provider": o.provider, "backend": o.backend,
            "gpus_per_replica": gpus, "ray": o.address or "local",
        }
        engine = EngineSettings(str(manifest.directory.resolve()), o.provider, o.backend, threads,
                                o.max_batch_wait_ms / 1000, o.fault_seed)
        limits = Limits(o.body_timeout_s, o.max_uploads, int(o.max_body_mb * 2**20))
        api = ApiSettings(str(manifest.directory.resolve()), limit, limits, o.max_request_samples, o.retries, summary)
        options = {"num_cpus": threads or 1}
        if gpus:
            options["num_gpus"] = gpus
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # set to INFO by importing ray.serve
        # the proxies Serve starts run proxy.WholeBodies and proxy.JsonErrors (ignored where Serve already runs)
        serve.start(http_options={"host": o.host, "port": self.port}, logging_config=SERVE_LOGGING,
                    controller_options={"runtime_env": {"env_vars": limits.environment()}})
        self._serve = True
        log.info("deploying %d replica(s) of %s (%s, batch %d, %s threads, %g GPUs each)", o.replicas,
                 manifest.directory, manifest.model.get("name"), model.batch, threads or "default", gpus)
        t0 = time.perf_counter()
        try:
            serve.run(build_app(engine, api, o.replicas, max_ongoing, options), name=APP_NAME, route_prefix="/",
                      logging_config=SERVE_LOGGING)
        except RuntimeError as e:
            raise EngineError(f"deploying failed: {_deploy_message(serve, APP_NAME) or one_line(e)}") from None
        log.info("ready in %.1f s: %s", time.perf_counter() - t0, self.url)

    def stop(self) -> None:
        """Shut down what ``start`` started (a joined cluster keeps running; only the application goes)."""
        if self._serve:
            from ray import serve

            from .app import APP_NAME

            log.info("shutting down")
            try:
                serve.shutdown() if self.local else serve.delete(APP_NAME)
            finally:
                self._serve = False
        if self._ray:
            import ray

            ray.shutdown()
            self._ray = False


def serve_forever(options: ServeOptions, ready=None) -> None:
    """Start, call ``ready(url)``, serve until Ctrl-C or SIGTERM, stop."""
    server = Server(options)
    try:
        server.start()
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
        if ready is not None:
            ready(server.url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        server.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _check_address(address: str) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) where nothing accepts a connection within
    ``CONNECT_WAIT_S``; ``auto`` and other forms are Ray's to resolve (it says at once when it finds none)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, CONNECT_WAIT_S)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"--address {address}: expected a Ray cluster listening there, got no connection "
                                  f"in {CONNECT_WAIT_S:g} s ({e.strerror or type(e).__name__})") from None
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _deploy_message(serve, app_name: str) -> str | None:
    """The last line of the failing deployment's message (a replica constructor's exception)."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the controller may be gone too; the caller has serve.run's own message
        return None
    for deployment in (app.deployments.values() if app else ()):
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return app.message.strip().splitlines()[-1] if app and app.message and app.message.strip() else None
