"""The embedded runtime: ``Pipeline.load(DIR)`` and ``.generate(...)``.

    pipe = Pipeline.load("engines/dit")               # best ONNX Runtime provider that really loads
    out = pipe.generate(class_labels=[207, 360], seed=0)
    out.latents, out.images, out.provider, out.timings
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ClusCaConfig, Method
from ..engines.base import StepEngine
from ..engines.manifest import Manifest
from ..errors import EngineError, EngineMismatchError
from ..schedule import count_kinds, plan
from ..spec import ExportSpec
from . import dit
from .driver import ScheduledDenoiser

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")


@dataclass
class GenerateResult:
    latents: np.ndarray
    labels: np.ndarray
    config: ClusCaConfig
    provider: str
    backend: str
    seconds: float
    images: np.ndarray | None = None  # [n, H, W, C] float32 in [0, 1], where a decoder exists
    timings: dict[str, list[float]] = field(default_factory=dict)
    step_counts: dict[str, int] = field(default_factory=dict)

    @property
    def method(self) -> Method:
        return self.config.method


class Pipeline:
    """ClusCa sampling over a set of step engines (ONNX Runtime, torch; TensorRT later)."""

    def __init__(self, engine: StepEngine, model: dict, defaults: ClusCaConfig, manifest: Manifest | None = None):
        self.engine = engine
        self.spec: ExportSpec = engine.spec
        self.model = model
        self.defaults = defaults
        self.manifest = manifest

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        directory: str | Path,
        provider: str = "auto",
        backend: str = "onnxruntime",
        verify: bool = True,
        threads: int | None = None,
    ) -> "Pipeline":
        """Open an engine directory. ``verify`` checks every file's size and sha256 first."""
        manifest = Manifest.read(Path(directory))
        manifest.verify(hashes=verify)
        spec = manifest.spec
        if backend == "onnxruntime":
            from ..engines.ort import OrtEngine

            engine = OrtEngine(spec, manifest.graph_paths(), provider=provider, threads=threads)
        elif backend == "torch":
            engine = _torch_engine_from_manifest(manifest, spec)
        else:
            raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        log.info("engines from %s run on %s/%s", directory, engine.backend, engine.provider)
        return cls(engine, manifest.model, _defaults(manifest.defaults), manifest)

    @classmethod
    def from_adapter(cls, adapter, spec: ExportSpec, device: str = "cpu") -> "Pipeline":
        """The PyTorch reference: the step graphs run eagerly over ``adapter`` (no export)."""
        from ..engines.torch_backend import TorchEngine

        model = {"family": adapter.family, "config": adapter.cfg.to_dict()}
        return cls(TorchEngine(adapter, spec, device), model, adapter.default_run)

    # -- settings -------------------------------------------------------------------------
    def resolve_config(
        self,
        method: str = "clusca",
        interval: int | None = None,
        propagation: float | None = None,
        order: int | None = None,
        warmup: int | None = None,
        fresh: str | None = None,
        clusters: int | None = None,
    ) -> ClusCaConfig:
        built_k = self.spec.options.clusters
        if clusters is not None and clusters != built_k:
            raise EngineMismatchError(
                f"engines were built with --clusters {built_k}, requested {clusters}; "
                f"rebuild with clusca-trt build --clusters {clusters}"
            )
        return ClusCaConfig.for_method(
            method,
            built_clusters=built_k if self.spec.clustered_groups else 0,
            built_order=self.spec.options.order,
            defaults=self.defaults,
            interval=interval,
            propagation=propagation,
            order=order,
            warmup=warmup,
            fresh=fresh,
        )

    # -- sampling -------------------------------------------------------------------------
    def generate(
        self,
        class_labels,
        seed: int = 0,
        method: str = "clusca",
        interval: int | None = None,
        propagation: float | None = None,
        order: int | None = None,
        steps: int = 50,
        sampler: str = "ddim",
        cfg_scale: float = 1.5,
        warmup: int | None = None,
        fresh: str | None = None,
        clusters: int | None = None,
        progress=None,
    ) -> GenerateResult:
        config = self.resolve_config(method, interval, propagation, order, warmup, fresh, clusters)
        planned = plan(steps, config, self.spec.options.order)
        mcfg = self.model["config"]
        latent_shape = (mcfg["in_channels"], mcfg["input_size"], mcfg["input_size"])
        denoisers: list[ScheduledDenoiser] = []

        def make(rng):
            d = ScheduledDenoiser(self.engine, planned, config, rng)
            d.reset()
            denoisers.append(d)
            return d

        t0 = time.perf_counter()
        latents = dit.sample(
            make,
            self.spec.options.batch,
            latent_shape,
            list(class_labels),
            seed,
            steps,
            sampler,
            cfg_scale,
            mcfg["num_classes"],
            progress,
        )
        seconds = time.perf_counter() - t0
        timings: dict[str, list[float]] = {}
        for d in denoisers:
            for k, v in d.timings.items():
                timings.setdefault(k, []).extend(v)
        counts = {k.value: v for k, v in count_kinds(planned).items()}
        log.info(
            "%s: %d steps (%s) on %s/%s in %.3f s",
            config.method.value,
            steps,
            ", ".join(f"{v} {k}" for k, v in counts.items() if v),
            self.engine.backend,
            self.engine.provider,
            seconds,
        )
        return GenerateResult(
            latents=latents,
            labels=np.asarray(list(class_labels), dtype=np.int64),
            config=config,
            provider=self.engine.provider,
            backend=self.engine.backend,
            seconds=seconds,
            images=None,
            timings=timings,
            step_counts=counts,
        )

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _defaults(d: dict) -> ClusCaConfig:
    return ClusCaConfig(**d) if d else ClusCaConfig()


def _torch_engine_from_manifest(manifest: Manifest, spec: ExportSpec):
    from ..engines.torch_backend import TorchEngine
    from ..models import load_model

    m = manifest.model
    src = m["source"]
    if src["kind"] == "random-init":
        loaded = load_model(m["name"], random_init=True, seed=src["seed"])
    else:
        loaded = load_model(m["name"], checkpoint=src["path"])
        if loaded.source["sha256"] != src["sha256"]:
            raise EngineMismatchError(
                f"checkpoint {src['path']} changed since the engines were built (sha256 differs); rebuild"
            )
    return TorchEngine(loaded.adapter, spec)
