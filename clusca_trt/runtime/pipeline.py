"""The embedded runtime: ``Pipeline.load(DIR)`` and ``.generate(...)``.

    pipe = Pipeline.load("engines/dit")               # ONNX Runtime, the best provider that really loads
    out = pipe.generate([207, 360], seed=0)           # DiT: class labels; FLUX: a prompt
    out.latents, out.images, out.engine, out.timings

The ClusCa settings (method, interval, propagation, order, warm-up, fresh policy, update rule,
correction, pairing) are the same for every model family; the family's inputs
(``clusca_trt.families``: DiT's class labels, sampler and guidance; FLUX's prompts or embeddings and
guidance, ...) are checked against its schema and its runtime module (``runtime/<family>.py``) samples.

A ``Pipeline`` may be shared by threads: it serialises its calls with a lock around the engine
(whose state, the module caches, is one per engine), so every call gets the result it gets
alone. For throughput, use one ``Pipeline`` per thread (or the engine batch).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ClusCaConfig, Method, is_int
from ..engines.base import EngineInfo, StepEngine
from ..engines.manifest import Manifest, read_build
from ..engines.open import open_engine
from ..errors import ConfigError, EngineError, EngineMismatchError
from ..families import Family, family
from ..schedule import PlannedStep, count_kinds, plan
from ..spec import ExportSpec
from .denoiser import SampleKey, ScheduledDenoiser, check_noise_cost
from .inputs import check_finite_output

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """One ``generate`` call's result.

    latents:  the sampled latents [n, ...] (float32), in the sampler's layout (DiT [n, C, H, W]).
    labels:   DiT's class labels [n] (int64); None for prompt families.
    config:   the ClusCa settings that ran (defaults resolved).
    provider: ONNX Runtime's execution provider; None on the other backends (``engine`` says all).
    backend:  the backend that ran (``engine.backend``).
    seconds:  wall time of the sampling (not of loading or decoding).
    engine:   which backend, provider, device, precision and hardware ran (``EngineInfo``).
    images:   decoded images [n, H, W, C] (videos [n, F, H, W, C]) float32 in [0, 1], where a decoder exists.
    timings:  seconds per graph call, by graph name (host wall time; empty on the device-loop path).
    step_counts: steps of each kind (full, partial, forecast).
    extra:    what the family adds (FLUX: the prompts, the step count).
    """

    latents: np.ndarray
    labels: np.ndarray | None
    config: ClusCaConfig
    provider: str | None
    backend: str
    seconds: float
    engine: EngineInfo | None = None
    images: np.ndarray | None = None  # [n, H, W, C] float32 in [0, 1], where a decoder exists
    timings: dict[str, list[float]] = field(default_factory=dict)
    step_counts: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def method(self) -> Method:
        return self.config.method


class Pipeline:
    """ClusCa sampling over the step engines of one build (ONNX Runtime, torch, TensorRT, OpenVINO).

    Make one with ``Pipeline.load(directory)`` (a build) or ``Pipeline.from_adapter(adapter, spec)``
    (the PyTorch step modules, no export); sample with ``generate``; ``close()`` (or ``with``) frees
    the engine, after which ``generate`` refuses to run."""

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
        self.family: Family = family(model["family"])
        self._lock = threading.RLock()  # one run at a time on the engine's state (see the module docstring)
        self._closed = False

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
        load_adapter=None,
    ) -> "Pipeline":
        """Open the engine directory ``directory`` (what ``clusca-trt build`` wrote).

        backend:   ``onnxruntime`` (default), ``openvino`` (the same graphs on OpenVINO's CPU plugin,
                   its compiled models cached in ``<directory>/openvino-cache``), ``torch`` (the PyTorch
                   step modules of the model the build was made from, loaded by the build's family),
                   ``tensorrt`` (the plans of ``build --backend tensorrt``); see ``engines.open``.
        provider:  ONNX Runtime's execution provider: ``auto`` (the best one that really loads), ``cpu``,
                   ``cuda``, ``tensorrt``.
        verify:    check every file's sha256 first (sizes, and each graph's inputs and outputs against
                   the manifest's spec, are always checked).
        threads:   intra-op threads of a CPU backend (None: the backend's default).
        select:    the build to open where the directory holds several (FLUX: one per resolution),
                   e.g. ``{"height": 768, "width": 1360}``.
        device:    ``cpu``, ``cuda`` or ``cuda:N`` (torch backend; TensorRT: its GPU).
        precision: ``fp32``, ``bf16`` or ``fp16`` of the torch backend; of the openvino backend's model
                   graphs (default: bf16 where the CPU has bf16 units, else fp32); TensorRT: checked
                   against its plans.
        load_adapter: the torch backend's model where the caller has it (``manifest -> adapter``;
                   ``clusca_trt.diffusers``: the pipeline's own transformer); default: loaded by the
                   build's family from its recorded source.

        Returns a ``Pipeline``; raises ``EngineError`` (a missing, corrupt or mismatched build),
        ``ConfigError`` (an option out of range), ``BackendUnavailableError`` (a backend or device this
        machine cannot run). Every file comes from the one build the manifest names (never a mix of
        two, even during a rebuild)."""

        _check_load_options(directory, verify, threads, select)

        def open_checked(manifest: Manifest):
            manifest.check(hashes=verify)
            fam = family(manifest.model["family"])
            load = (lambda: load_adapter(manifest)) if load_adapter else (lambda: fam.load_model(manifest.model).adapter)
            engine = open_engine(manifest, backend, provider=provider, threads=threads, device=device,
                                 precision=precision, load_adapter=load)
            return manifest, engine

        manifest, engine = read_build(Path(directory), open_checked, select)
        log.info("engines from %s run on %s", directory, engine.info)
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
        method: str | None = None,
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
        """The settings a run uses: ``method`` None is the build's default method (the method of its
        ``defaults``: clusca unless ``clusca-trt tune --write`` chose another); unset options take
        the build's defaults."""
        built_k = self.spec.options.clusters
        if clusters is not None and (not is_int(clusters) or clusters < 0):
            raise ConfigError(f"clusters must be an integer >= 0, got {clusters!r}")
        if method is None:
            method = self.defaults.method
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

    def check_config(self, config: ClusCaConfig) -> None:
        """Refuse a ``ClusCaConfig`` these engines cannot run: K other than 0 or the built K (K is
        static in the graphs), K > 0 on engines that cluster nothing, O above the built order."""
        if not isinstance(config, ClusCaConfig):
            raise ConfigError(f"expected config to be a ClusCaConfig, got {type(config).__name__}")
        built_k = self.spec.options.clusters if self.spec.clustered_groups else 0
        if config.clusters not in (0, built_k):
            raise EngineMismatchError(f"engines were built with --clusters {built_k}, requested {config.clusters}; "
                                      f"expected 0 or {built_k}")
        if config.order > self.spec.options.order:
            raise ConfigError(f"order must be <= the built Taylor order {self.spec.options.order}, got {config.order}")

    # -- sampling -------------------------------------------------------------------------
    def generate(
        self,
        *args,
        method: str | None = None,
        interval: int | None = None,
        propagation: float | None = None,
        order: int | None = None,
        warmup: int | None = None,
        fresh: str | None = None,
        clusters: int | None = None,
        update: str | None = None,
        correction: float | None = None,
        pair: bool | None = None,
        config: ClusCaConfig | None = None,
        **inputs,
    ) -> GenerateResult:
        """Sample with the engines, and decode where the build has a decoder.

        ClusCa settings (None: the build's defaults, ``inspect`` shows them, ``clusca-trt tune
        --write`` chooses them): ``method`` (clusca, taylorseer, fora, full; None: the defaults'),
        ``interval`` N, ``propagation`` gamma, ``order`` O (<= built), ``warmup`` W, ``fresh``
        (random, nearest), ``clusters`` (must equal the built K), ``update`` (paper, residual, step: how a partial step's
        fresh tokens update the caches), ``correction`` (the share of the fresh correction applied, one
        value or one per block), ``pair`` (guidance rows share their clusters); or ``config``, a whole
        ``ClusCaConfig`` run as given (checked against the build; no other setting with it).

        The family's inputs, by keyword (the first may also be given positionally), as
        ``clusca_trt.families`` declares them:

        * every family: ``seed`` (0), ``steps`` (the family's: 50; FLUX-schnell 4), ``keys`` (one
          ``(seed, index)`` per sample instead of ``(seed, 0), (seed, 1), ...``), ``progress``
          (called with each finished step's index);
        * DiT: ``class_labels`` (required: a list of ints), ``sampler`` (ddim, ddpm), ``cfg_scale`` (1.5);
        * FLUX: ``prompt`` (a string or a list) or ``prompt_embeds`` [n, text_length, T5 dim] with
          ``pooled_prompt_embeds`` [n, CLIP dim], ``guidance_scale`` (3.5), ``text_propagation`` (0.0),
          ``encoders`` (the folder of the text encoders);
        * HunyuanVideo: as FLUX, plus ``prompt_attention_mask`` [n, text_length] with the embeddings;
          ``guidance_scale`` 6.0.

        Every input is checked and the decoder loaded before sampling starts (a bad one raises a
        one-line ``InputError`` / ``ConfigError``); calls from several threads run one at a time.
        Returns a ``GenerateResult``."""
        family_inputs = self.family.resolve(args, inputs, self.model.get("sampling") or {})
        if family_inputs.get("keys"):  # what their noise costs, by the sample size (the runtimes check it too)
            check_noise_cost(family_inputs["keys"], self.spec.model_inputs[0].shape[1:])
        settings = (method, interval, propagation, order, warmup, fresh, clusters, update, correction, pair)
        if config is None:
            config = self.resolve_config(*settings)
        elif any(v is not None for v in settings):
            raise ConfigError("expected either config or method and settings, got both")
        else:
            self.check_config(config)
        with self._lock:
            if self._closed:
                raise EngineError("this Pipeline is closed: expected an open one, got a closed one; load it again")
            self.prepare_decoder()  # under the lock: threads' first calls load the decoder once
            return self.family.generate(self, config, family_inputs)

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
            "%s: %d steps (%s) on %s in %.3f s",
            config.method.value,
            len(factory.planned),
            ", ".join(f"{v} {k}" for k, v in counts.items() if v),
            self.engine.info,
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
            engine=self.engine.info,
            images=images,
            timings=factory.timings(),
            step_counts=counts,
            extra=extra,
        )

    def close(self) -> None:
        """Free the engine; ``generate`` refuses to run afterwards. Closing twice is harmless."""
        with self._lock:
            if not self._closed:
                self._closed = True
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

    def __call__(self, keys: list[SampleKey]) -> ScheduledDenoiser:
        d = ScheduledDenoiser(self.engine, self.planned, self.config, keys, self.propagation)
        d.reset()
        self.made.append(d)
        return d

    def timings(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for d in self.made:
            for k, v in d.timings.items():
                out.setdefault(k, []).extend(v)
        return out


MAX_THREADS = 4096


def _check_load_options(directory, verify, threads, select) -> None:
    """``Pipeline.load``'s own arguments, each of its type and range, before anything is read (the
    provider, backend, device and precision are checked where they are used, also before loading)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ConfigError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__} "
                          f"{_shown(directory)}")
    if not isinstance(verify, bool):
        raise ConfigError(f"verify must be True or False, got {_shown(verify)}")
    if threads is not None and (not is_int(threads) or not 1 <= threads <= MAX_THREADS):
        raise ConfigError(f"threads must be None or an integer in 1..{MAX_THREADS}, got {_shown(threads)}")
    if select is not None:
        if not isinstance(select, dict):
            raise ConfigError(f"select must be a dict of build options (e.g. {{'height': 768}}), got "
                              f"{type(select).__name__} {_shown(select)}")
        for k, v in select.items():
            if not isinstance(k, str) or not (v is None or is_int(v)):
                raise ConfigError(f"select must map option names to integers (e.g. {{'height': 768}}), got "
                                  f"{_shown(k)}: {_shown(v)}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _defaults(d: dict) -> ClusCaConfig:
    return ClusCaConfig(**d) if d else ClusCaConfig()
