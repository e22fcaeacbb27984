"""The embedded runtime: ``Pipeline.load(DIR)`` and ``.generate(...)``.

    pipe = Pipeline.load("engines/dit")               # best ONNX Runtime provider that really loads
    out = pipe.generate(class_labels=[207, 360], seed=0)
    out.latents, out.images, out.provider, out.timings

The ClusCa settings (method, interval, propagation, order, warm-up, fresh policy, update rule,
correction, pairing) are the same for every model family; the family's runtime module (``runtime/<family>.py``) takes
the rest (class labels or prompts, sampler, guidance) and drives the denoiser.

A ``Pipeline`` may be shared by threads: it serialises its calls with a lock around the engine
(whose state, the module caches, is one per engine), so every call gets the result it gets
alone. For throughput, use one ``Pipeline`` per thread (or the engine batch).
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ClusCaConfig, Method
from ..engines.base import StepEngine
from ..engines.manifest import Manifest, read_build
from ..engines.open import open_engine
from ..errors import ConfigError, EngineMismatchError
from ..schedule import PlannedStep, count_kinds, plan
from ..spec import ExportSpec
from .driver import SampleKey, ScheduledDenoiser
from .inputs import FiniteOutputs, check_finite_output, check_generate_inputs

log = logging.getLogger(__name__)

# family -> module with ``generate(pipe, config, *args, **kwargs) -> GenerateResult``
FAMILY_RUNTIMES = {"dit": "clusca_trt.runtime.dit", "flux": "clusca_trt.runtime.flux",
                   "hunyuan-video": "clusca_trt.runtime.hunyuan_video"}


@dataclass
class GenerateResult:
    latents: np.ndarray
    labels: np.ndarray | None
    config: ClusCaConfig
    provider: str
    backend: str
    seconds: float
    images: np.ndarray | None = None  # [n, H, W, C] float32 in [0, 1], where a decoder exists
    timings: dict[str, list[float]] = field(default_factory=dict)
    step_counts: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def method(self) -> Method:
        return self.config.method


class Pipeline:
    """ClusCa sampling over a set of step engines (ONNX Runtime, torch; TensorRT later)."""

    def __init__(
        self,
        engine: StepEngine,
        model: dict,
        defaults: ClusCaConfig,
        manifest: Manifest | None = None,
        decoder: dict | None = None,
    ):
        self.engine = engine
        self.spec: ExportSpec = engine.spec
        self.model = model
        self.defaults = defaults
        self.manifest = manifest
        self.decoder = decoder
        self._lock = threading.RLock()  # one run at a time on the engine's state (see the module docstring)
        family = model["family"]
        if family not in FAMILY_RUNTIMES:
            raise ConfigError(f"model family must be one of {', '.join(FAMILY_RUNTIMES)}, got {family!r}")
        self.family = importlib.import_module(FAMILY_RUNTIMES[family])

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        directory: str | Path,
        provider: str = "auto",
        backend: str = "onnxruntime",
        verify: bool = True,
        threads: int | None = None,
        select: dict | None = None,
        device: str | None = None,
        precision: str | None = None,
    ) -> "Pipeline":
        """Open an engine directory. ``verify`` checks every file's sha256 first; sizes, and each graph
        file's inputs and outputs against the manifest's spec, are always checked. Every file comes
        from the one build the manifest names (never a mix of two, even during a rebuild).

        A directory with several builds (FLUX: one per resolution) opens the one whose build
        options match ``select``, e.g. ``{"height": 768, "width": 1360}``. ``device`` (cpu, cuda,
        cuda:N) and ``precision`` (fp32, bf16, fp16) choose where and how the torch backend runs
        (TensorRT: the device; see ``engines.open``)."""

        def open_checked(manifest: Manifest):
            manifest.check(hashes=verify)
            return manifest, open_engine(manifest, backend, provider=provider, threads=threads, device=device,
                                         precision=precision)

        manifest, engine = read_build(Path(directory), open_checked, select)
        log.info("engines from %s run on %s/%s", directory, engine.backend, engine.provider)
        return cls(engine, manifest.model, _defaults(manifest.defaults), manifest, manifest.data.get("decoder"))

    @classmethod
    def from_adapter(cls, adapter, spec: ExportSpec, device: str = "cpu", decoder: dict | None = None,
                     precision: str = "fp32", cuda_graphs: bool = True) -> "Pipeline":
        """The step graphs run by PyTorch over ``adapter`` (no export): the reference in fp32 on the
        CPU, a GPU backend on ``cuda[:N]``. The adapter is moved (and for bf16 / fp16 cast) in place."""
        from ..engines.torch_backend import TorchEngine

        model = {"family": adapter.family, "config": adapter.cfg.to_dict(), "sampling": adapter.sampling_info()}
        engine = TorchEngine(adapter, spec, device, precision=precision, cuda_graphs=cuda_graphs)
        return cls(engine, model, adapter.default_run, decoder=decoder)

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
        update: str | None = None,
        correction: float | None = None,
        pair: bool | None = None,
    ) -> ClusCaConfig:
        built_k = self.spec.options.clusters
        if clusters is not None and clusters != built_k:
            raise EngineMismatchError(
                f"engines were built with --clusters {built_k}, requested {clusters}; "
                f"rebuild with clusca-trt build --clusters {clusters}"
            )
        config = ClusCaConfig.for_method(
            method,
            built_clusters=built_k if self.spec.clustered_groups else 0,
            built_order=self.spec.options.order,
            defaults=self.defaults,
            interval=interval,
            propagation=propagation,
            order=order,
            warmup=warmup,
            fresh=fresh,
            update=update,
            correction=correction,
            pair=pair,
        )
        if config.clusters:
            config.corrections(self.spec.update_blocks)  # one per block of these engines, if a list
        return config

    # -- sampling -------------------------------------------------------------------------
    def generate(
        self,
        *args,
        method: str = "clusca",
        interval: int | None = None,
        propagation: float | None = None,
        order: int | None = None,
        warmup: int | None = None,
        fresh: str | None = None,
        clusters: int | None = None,
        update: str | None = None,
        correction: float | None = None,
        pair: bool | None = None,
        **kwargs,
    ) -> GenerateResult:
        """Sample. ClusCa settings here; the family's inputs (DiT: ``class_labels``, ``seed``,
        ``steps``, ``sampler``, ``cfg_scale``) in ``args``/``kwargs``. Every input is checked and the
        decoder loaded before sampling starts; calls from several threads run one at a time."""
        check_generate_inputs(self.model["family"], args, kwargs)
        config = self.resolve_config(method, interval, propagation, order, warmup, fresh, clusters, update, correction,
                                     pair)
        with self._lock:
            self.prepare_decoder()  # under the lock: threads' first calls load the decoder once
            return self.family.generate(self, config, *args, **kwargs)

    def prepare_decoder(self) -> None:
        """Load the decoder (VAE) now, so that a missing or broken one fails before sampling."""
        from .decode import prepare

        prepare(self.decoder)

    def plan(self, steps: int, config: ClusCaConfig) -> list[PlannedStep]:
        return plan(steps, config, self.spec.options.order)

    def denoisers(
        self, planned: list[PlannedStep], config: ClusCaConfig, propagation: dict[str, float] | None = None
    ) -> "DenoiserFactory":
        """``propagation``: gamma per token group where it differs from ``config.propagation``."""
        return DenoiserFactory(self.engine, planned, config, propagation)

    def result(self, factory: "DenoiserFactory", latents, labels, seconds: float, **extra) -> GenerateResult:
        """Package a run: decode images where a decoder exists, sum the engine timings, log."""
        from .decode import decode

        check_finite_output("the sampled latents", latents)
        counts = {k.value: v for k, v in count_kinds(factory.planned).items()}
        config = factory.config
        log.info(
            "%s: %d steps (%s) on %s/%s in %.3f s",
            config.method.value,
            len(factory.planned),
            ", ".join(f"{v} {k}" for k, v in counts.items() if v),
            self.engine.backend,
            self.engine.provider,
            seconds,
        )
        images = decode(self.decoder, latents)
        check_finite_output("the decoded images", images)
        return GenerateResult(
            latents=latents,
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            config=config,
            provider=self.engine.provider,
            backend=self.engine.backend,
            seconds=seconds,
            images=images,
            timings=factory.timings(),
            step_counts=counts,
            extra=extra,
        )

    def close(self) -> None:
        with self._lock:
            self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DenoiserFactory:
    """Makes one ``ScheduledDenoiser`` per chunk (each with its samples' keys, state reset)."""

    def __init__(
        self,
        engine: StepEngine,
        planned: list[PlannedStep],
        config: ClusCaConfig,
        propagation: dict[str, float] | None = None,
    ):
        self.engine, self.planned, self.config = engine, planned, config
        self.propagation = propagation
        self.made: list[ScheduledDenoiser] = []

    def __call__(self, keys: list[SampleKey]) -> FiniteOutputs:
        d = ScheduledDenoiser(self.engine, self.planned, self.config, keys, self.propagation)
        d.reset()
        self.made.append(d)
        return FiniteOutputs(d)  # a NaN/inf model output stops the run at its step

    def timings(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for d in self.made:
            for k, v in d.timings.items():
                out.setdefault(k, []).extend(v)
        return out


def _defaults(d: dict) -> ClusCaConfig:
    return ClusCaConfig(**d) if d else ClusCaConfig()
