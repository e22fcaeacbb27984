"""ClusCa inside a diffusers pipeline, in one line: ``enable(pipe, **settings)`` and ``disable(pipe)``.

    import clusca_trt
    clusca_trt.enable(pipe, interval=6, clusters=16, propagation=0.005)   # our PyTorch step modules
    clusca_trt.enable(pipe, engines="engines/flux", backend="onnxruntime")  # or a build of this transformer
    image = pipe("an oil painting of a couple under an umbrella", num_inference_steps=50).images[0]
    clusca_trt.disable(pipe)

Pipelines: ``DiTPipeline``, ``FluxPipeline``, ``HunyuanVideoPipeline`` (any pipeline whose transformer
is one of the families' diffusers transformers, ``clusca_trt.families``, and calls it as those do).
The pipeline stays in charge of everything but the transformer's forward: its scheduler, guidance,
``generator``, ``num_images_per_prompt``, ``callback_on_step_end``, ``output_type``, ... .

How: the transformer's forward is replaced through diffusers' own hook registry (a ``ModelHook``
named ``clusca_trt``), and the pipeline object's class by a subclass of it whose ``__call__`` marks
the start and end of a pipeline call (``isinstance`` and ``save_pretrained`` see the same class).
Within a call, the transformer's ``n``-th forward is step ``n`` of ClusCa's static schedule
(``schedule.plan``) for the number of timesteps the pipeline's scheduler holds at the first forward
(``num_inference_steps``; img2img's later start is found from the first timestep); the caches,
k-means state and conditioning tables are reset at every call. Every step runs the planned step
graphs (``runtime.denoiser.ScheduledDenoiser``) on:

* our PyTorch step modules over the transformer's own weights (no ``engines``: the torch backend,
  on the transformer's device, in its dtype, with CUDA graphs on a GPU; made for each call's batch
  and resolution, the last one kept); or
* a build (``engines=DIR``, any backend ``Pipeline.load`` opens), checked at ``enable`` to be of this
  transformer's weights (the manifest's source sha256 against the folder the transformer was loaded
  from; where there is no folder, the weights themselves against the build's source model).

The conditioning (timestep, labels or text embeddings) of every step is computed ahead, from the
first step's inputs and the scheduler's timesteps, and checked against what each step brings (a
``callback_on_step_end`` that changes the prompt embeddings makes the tables be computed again).
ClusCa's own draws (k-means starts, fresh tokens) come from ``seed`` (default 0): sample ``j`` of a
call has the key ``(seed, j)``, as ``Pipeline.generate(seed=seed)`` gives it, so with the pipeline's
initial noise the two give the same result.

What is refused (one-line error) and what falls back to the original transformer (one warning per
pipeline call, the call's result is the original transformer's from that step on):

=============================================================  ===========================================
case                                                           behaviour
=============================================================  ===========================================
a build of other weights than the pipeline's transformer       ``EngineMismatchError`` at ``enable``
a LoRA or other weights loaded into the transformer after       ``EngineMismatchError`` at the next call
``enable`` (its parameters changed or were replaced)            (``disable`` and ``enable`` again)
diffusers cache hooks or accelerate offload hooks on it        ``ConfigError`` at ``enable`` (or next call)
a build, and a call of another resolution / text length        ``EngineMismatchError`` at the first step
a build, and a call with more samples than its batch           ``EngineMismatchError`` at the first step
arguments our graphs do not model (ControlNet residuals,       the original transformer, one warning
attention kwargs, other position ids, image conditioning)
changed attention processors (``set_attn_processor``)          the original transformer, one warning
a second transformer call per step (true CFG's "uncond")       the original transformer, one warning
more transformer calls than the scheduler's timesteps          the original transformer, one warning
=============================================================  ===========================================

The torch path serves any batch and resolution (its step modules are made for each call's); a
call's rows pad a build's batch where they are fewer. A transformer called outside a pipeline call
(directly, or from another thread than the one calling the pipeline) runs unchanged.

Threads: an enabled pipeline may be called from several threads; the calls run one at a time (a
lock around the whole pipeline call: diffusers' scheduler and our engine state are one per
pipeline), so each caller gets the result it gets alone. For throughput use one pipeline per thread.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import MAX_SEED, ClusCaConfig, Method
from .engines.base import NP_DTYPES
from .engines.manifest import Manifest, find_build, list_builds
from .errors import ConfigError, EngineMismatchError
from .families import FAMILIES, Family
from .fields import check_finite, check_int
from .hashing import tree_sha256
from .runtime.pipeline import Pipeline
from .schedule import count_kinds
from .spec import BuildOptions

log = logging.getLogger(__name__)

STATE = "_clusca_trt"  # the pipeline attribute holding its ``Enabled``
HOOK = "clusca_trt"  # the name of our hook in the transformer's diffusers hook registry
PRECISION_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Settings:
    """``enable``'s settings, checked once (see ``enable``)."""

    method: Method = Method.CLUSCA
    interval: int | None = None
    clusters: int | None = None
    propagation: float | None = None
    order: int | None = None
    warmup: int | None = None
    fresh: str | None = None
    update: str | None = None
    correction: float | tuple[float, ...] | None = None
    pair: bool | None = None
    text_propagation: float | None = None
    text_clusters: int | None = None
    seed: int = 0
    engines: Path | None = None
    backend: str | None = None
    device: str | None = None
    precision: str | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method.parse(self.method))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0, MAX_SEED))
        for name in ("clusters", "text_clusters"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0, 1 << 20)
        if self.text_propagation is not None:
            object.__setattr__(self, "text_propagation", check_finite(
                "text_propagation", self.text_propagation, ConfigError, 0.0, 1.0))
        if self.engines is not None:
            object.__setattr__(self, "engines", Path(self.engines))
        elif self.backend not in (None, "torch"):
            raise ConfigError(f"without engines ClusCa runs our PyTorch step modules: expected backend torch or none, "
                              f"got {self.backend!r}; pass engines=DIR for a build")
        if self.precision not in (None, *PRECISION_OF.values()):
            raise ConfigError(f"precision must be one of {', '.join(PRECISION_OF.values())}, got {self.precision!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"verify must be True or False, got {self.verify!r}")

    def built(self, defaults: ClusCaConfig) -> tuple[int, int]:
        """(K, O) the torch path's step modules are made with: what the method needs, no more."""
        if self.method in (Method.FULL, Method.FORA):
            return 0, 0
        order = defaults.order if self.order is None else self.order
        if self.method is Method.TAYLORSEER:
            return 0, order
        return (defaults.clusters if self.clusters is None else self.clusters), order

    def config(self, built_clusters: int, built_order: int, defaults: ClusCaConfig) -> ClusCaConfig:
        return ClusCaConfig.for_method(self.method, built_clusters=built_clusters, built_order=built_order,
                                       defaults=defaults, interval=self.interval, propagation=self.propagation,
                                       order=self.order, warmup=self.warmup, fresh=self.fresh, update=self.update,
                                       correction=self.correction, pair=self.pair)

    def resolve(self, holder: Pipeline) -> ClusCaConfig:
        """The config on a build (its K must be ``clusters``, its order at least ``order``)."""
        return holder.resolve_config(self.method.value, self.interval, self.propagation, self.order, self.warmup,
                                     self.fresh, self.clusters, self.update, self.correction, self.pair)


# --------------------------------------------------------------------------------------------
# rows: a call's batch in the graph batch


@dataclass(frozen=True)
class RowMap:
    """Where a call's rows are in the graph batch: graph row ``r`` is fed from call row ``index[r]``
    (a padding row repeats the first row of its half), call row ``i`` is graph row ``back[i]``."""

    index: np.ndarray
    back: np.ndarray
    identity: bool = False  # the call's rows are the graph batch as they are (no copy needed)


def samples(rows: int, guided: bool, multiplier: int) -> int:
    """The engine batch (samples) a call of ``rows`` rows needs: a guided call's halves are one
    sample's rows; other rows fill the graph rows as they come."""
    return rows // multiplier if guided and multiplier > 1 else -(-rows // multiplier)


def row_map(rows: int, guided: bool, multiplier: int, batch: int) -> RowMap:
    """The rows of a call in a graph batch of ``multiplier * batch`` rows (see ``RowMap``). A guided
    call (``[cond B | uncond B]``, DiT) keeps its halves: row ``j`` of half ``h`` is graph row
    ``h * batch + j``, so sample ``j`` has graph rows ``j, batch + j``, as ``Pipeline.generate`` has."""
    if guided and multiplier > 1 and rows % multiplier == 0:
        half = rows // multiplier
        if half > batch:
            raise ConfigError(f"expected at most {batch} samples for the graph batch, got {half}")
        index = np.array([h * half + (j if j < half else 0) for h in range(multiplier) for j in range(batch)])
        back = np.array([h * batch + j for h in range(multiplier) for j in range(half)])
    else:
        if rows > multiplier * batch:
            raise ConfigError(f"expected at most {multiplier * batch} rows for the graph batch, got {rows}")
        index = np.array([r if r < rows else 0 for r in range(multiplier * batch)])
        back = np.arange(rows)
    identity = len(index) == len(back) and bool((index == np.arange(len(index))).all())
    return RowMap(index.astype(np.int64), back.astype(np.int64), identity)


# --------------------------------------------------------------------------------------------
# the transformer as enable saw it


@dataclass(frozen=True)
class Fingerprint:
    """What ``enable`` saw of the transformer and each pipeline call checks again: its parameter
    names, where they are (device, dtype), their storage and version counters (an in-place change or
    a replaced tensor), its attention processors, and any diffusers hooks besides ours."""

    names: tuple[str, ...]
    where: frozenset
    values: tuple
    processors: tuple
    hooks: tuple[str, ...]

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Fingerprint":
        names, where, values = [], set(), []
        for name, p in module.named_parameters():
            names.append(name)
            where.add((str(p.device), p.dtype))
            values.append((p.data_ptr(), _version(p)))
        processors, hooks = [], []
        for name, m in module.named_modules():
            proc = m.__dict__.get("processor", m._modules.get("processor"))
            if proc is not None:
                processors.append((name, type(proc).__qualname__, id(proc)))
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None:
                hooks += [f"{name or 'transformer'}: {h}" for h in registry._hook_order if h != HOOK]
        return cls(tuple(names), frozenset(where), tuple(values), tuple(processors), tuple(hooks))


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _check_transformer(transformer: torch.nn.Module, fp: Fingerprint) -> None:
    """What ``enable`` refuses of a transformer: other diffusers hooks, accelerate offload hooks,
    parameters on several devices or in several dtypes."""
    if getattr(transformer, "_cache_config", None) is not None or fp.hooks:
        hooks = ", ".join(fp.hooks) or type(transformer._cache_config).__name__
        raise ConfigError(f"expected a transformer without diffusers cache hooks, got {hooks}; "
                          f"call pipe.transformer.disable_cache() (or remove the hooks) first")
    if any(hasattr(m, "_hf_hook") for m in transformer.modules()):
        raise ConfigError("expected a transformer without accelerate hooks (enable_model_cpu_offload, device_map), "
                          "got some; move the pipeline to one device with pipe.to(device) instead")
    if len(fp.where) > 1:
        got = ", ".join(sorted(f"{d} {str(t).replace('torch.', '')}" for d, t in fp.where))
        raise ConfigError(f"expected a transformer on one device in one dtype, got parameters on {got}; "
                          f"convert it with pipe.to(device, dtype)")


def _family_of(transformer) -> tuple[Family, object]:
    classes = {}
    for fam in FAMILIES.values():
        binding = getattr(fam.model(), "PIPELINE", None)
        if binding is not None:
            classes[binding.transformer_class] = (fam, binding)
    for cls in type(transformer).__mro__:
        if cls.__name__ in classes:
            return classes[cls.__name__]
    raise ConfigError(f"expected a pipeline whose transformer is a {' or '.join(classes)}, got "
                      f"{type(transformer).__name__}")


# --------------------------------------------------------------------------------------------
# engines: our step modules, or a build


@dataclass
class Served:
    """An engine ready for a call: the ``Pipeline`` holding it, the ClusCa config it runs, the
    propagation of the text tokens (FLUX, HunyuanVideo), where it came from (for messages)."""

    holder: Pipeline
    config: ClusCaConfig
    propagation: dict | None
    where: str
    key: tuple = ()

    def close(self) -> None:
        self.holder.close()


def _text_gamma(spec, settings: Settings) -> dict | None:
    if "txt" in {g.name for g in spec.groups}:
        return {"txt": settings.text_propagation or 0.0}  # the reference's (and Pipeline.generate's) default: 0
    if settings.text_propagation is not None:
        raise ConfigError(f"text_propagation applies to families with text tokens (FLUX, HunyuanVideo), "
                          f"got it for {spec.family}")
    return None


class TorchEngines:
    """Our PyTorch step modules over the pipeline's transformer, made for each call's shape and
    batch (the latest one kept: a new shape or batch replaces it)."""

    def __init__(self, owner: "Enabled"):
        s, t = owner.settings, owner.transformer
        self.owner = owner
        self.device, self.precision = where_shared(s, t)
        self.defaults = owner.binding.adapter_class.default_run
        self.built = s.built(self.defaults)
        s.config(*self.built, self.defaults)  # refuse bad settings now
        if self.built[0] and owner.family.name == "dit":  # DiT's tokens are known now; others' with the call
            side = t.config.sample_size // t.config.patch_size
            if self.built[0] > side * side:
                raise ConfigError(f"clusters must be <= the {side * side} image tokens, got {self.built[0]}")
        self.current: Served | None = None
        self.adapter: tuple[tuple, object] | None = None  # (shape, adapter) of the latest engine

    def get(self, call) -> tuple[Served, bool]:
        """(the engine for ``call``, whether it was made now)."""
        o = self.owner
        batch = samples(call.rows, call.guided, o.binding.adapter_class.cfg_multiplier)
        shape = tuple(sorted(call.shape.items()))
        key = (shape, batch)
        if self.current is not None and self.current.key == key:
            return self.current, False
        self.close()
        if self.adapter is None or self.adapter[0] != shape:  # another batch of one shape: the same adapter
            self.adapter = (shape, o.binding.adapter(o.transformer, call.shape, o.pipe))
        adapter = self.adapter[1]
        k, order = self.built
        text = o.settings.text_clusters
        if text is None and "text_length" in call.shape:
            text = min(k, call.shape["text_length"])
        spec = adapter.export_spec(BuildOptions(batch=batch, clusters=k, text_clusters=text, order=order))
        holder = Pipeline.from_adapter(adapter, spec, device=self.device, precision=self.precision)
        config = o.settings.config(k if spec.clustered_groups else 0, order, self.defaults)
        self.current = Served(holder, config, _text_gamma(spec, o.settings), "our step modules", key)
        log.info("clusca_trt: step modules for %s, batch %d, on %s", call.shape or "the model", batch, holder.engine.info)
        return self.current, True

    def moved(self) -> None:
        self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def where_shared(settings: Settings, transformer) -> tuple[str, str]:
    """(device, precision) of an engine that runs the transformer's own weights: the transformer's;
    ``settings.device`` / ``precision`` may only say the same (its parameters are shared, not copied)."""
    device, precision = str(transformer.device), PRECISION_OF.get(transformer.dtype)
    if precision is None:
        raise ConfigError(f"expected a transformer in float32, bfloat16 or float16, got {transformer.dtype}")
    same = {"device": settings.device is None or _same_device(settings.device, transformer.device),
            "precision": settings.precision in (None, precision)}
    for name, ok in same.items():
        if not ok:
            mine = device if name == "device" else precision
            raise ConfigError(f"our step modules run the transformer's own weights where they are: expected {name} "
                              f"{mine} (or none), got {getattr(settings, name)}; convert the pipeline with pipe.to(...)")
    return device, precision


def _same_device(given: str, device: torch.device) -> bool:
    try:
        want = torch.device(given)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {given!r}") from None
    return want.type == device.type and (want.index is None or want.index == (device.index or 0))


class BuildEngines:
    """The builds in ``settings.engines`` (one, or one per resolution), each opened when a call
    needs it (the latest one kept); checked at ``enable`` to be of the transformer's weights."""

    def __init__(self, owner: "Enabled"):
        s = owner.settings
        self.owner = owner
        self.directory = s.engines
        if s.backend == "torch":
            where_shared(s, owner.transformer)  # the same rule as our step modules': the weights are shared
        hashes: dict[Path, str] = {}
        for path in list_builds(self.directory):
            manifest = Manifest.read(path)
            if manifest.model.get("family") != owner.family.name:
                raise EngineMismatchError(f"engines in {path} are of a {manifest.model.get('family')} model, expected "
                                          f"a {owner.family.name} build for this pipeline's transformer")
            check_build_weights(manifest, owner, hashes)
        self.current: Served | None = None
        if (self.directory / "manifest.json").is_file():  # one build: open it now (settings checked now too)
            self.current = self._open(self.directory)

    def _open(self, path: Path) -> Served:
        o, s = self.owner, self.owner.settings
        kw = dict(backend=s.backend or "onnxruntime", verify=s.verify, device=s.device, precision=s.precision)
        if s.backend == "torch":
            kw.update(device=s.device or str(o.transformer.device),
                      precision=s.precision or PRECISION_OF.get(o.transformer.dtype),
                      load_adapter=lambda m: o.binding.adapter(o.transformer, m.model.get("options", {}), o.pipe))
        holder = Pipeline.load(path, **kw)
        try:
            config = s.resolve(holder)
            gamma = _text_gamma(holder.spec, s)
        except Exception:
            holder.close()
            raise
        return Served(holder, config, gamma, f"the build in {path}", (path,))

    def get(self, call) -> tuple[Served, bool]:
        path = find_build(self.directory, call.shape)  # another resolution: EngineMismatchError, one line
        made = self.current is None or self.current.key != (path,)
        if made:
            self.close()
            self.current = self._open(path)
        self._check_fits(self.current, call)
        return self.current, made

    def _check_fits(self, served: Served, call) -> None:
        spec, o = served.holder.spec, self.owner
        mult = o.binding.adapter_class.cfg_multiplier
        n = samples(call.rows, call.guided, mult)
        if n > spec.options.batch:
            raise EngineMismatchError(f"{served.where} takes at most {spec.options.batch} samples per call (its batch), "
                                      f"got {n}; rebuild it with clusca-trt build --batch {n}")
        for group, tensors in (("model", spec.model_inputs), ("cond", spec.cond_inputs)):
            for t in tensors:
                given = getattr(call, group).get(t.name)
                if given is not None and tuple(given.shape[1:]) != t.shape[1:]:
                    raise EngineMismatchError(f"{served.where} takes {t.name} of shape {list(t.shape[1:])} per row, "
                                              f"got {list(given.shape[1:])}; build it for this shape")

    def moved(self) -> None:
        if self.owner.settings.backend == "torch":
            self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def _local_folder(transformer) -> Path | None:
    name = transformer.config.get("_name_or_path") if hasattr(transformer, "config") else None
    path = Path(name) if isinstance(name, str) and name else None
    return path if path is not None and path.is_dir() else None


def check_build_weights(manifest: Manifest, owner: "Enabled", hashes: dict) -> None:
    """The build's weights are the pipeline's transformer's, or an ``EngineMismatchError``.

    A build records its source (``model.source``): where that has a sha256 and the transformer was
    loaded from a local folder (``config._name_or_path``), the folder's (or, for DiT, its pipeline
    folder's) hash must be that sha256; otherwise (random weights, a transformer made in memory) the
    build's source model is loaded and its weights compared with the transformer's."""
    src = manifest.model.get("source", {})
    what = src.get("path") or (f"random weights (seed {src.get('seed')})" if src.get("kind") == "random-init"
                               else src.get("kind", "an unknown source"))
    where = f"engines in {manifest.directory}"
    folder = _local_folder(owner.transformer)
    if src.get("sha256") and folder is not None:
        candidates = [folder] + ([folder.parent] if (folder.parent / "model_index.json").is_file() else [])
        for c in candidates:
            if c not in hashes:
                log.info("clusca_trt: hashing %s to check it against %s", c, where)
                hashes[c] = tree_sha256(c)
        if src["sha256"] in {hashes[c] for c in candidates}:
            return
        raise EngineMismatchError(f"{where} were built from other weights: expected the transformer of {what} "
                                  f"(sha256 {src['sha256'][:12]}), got the one of {folder} (sha256 {hashes[folder][:12]}); "
                                  f"rebuild them from this pipeline's transformer")
    theirs = owner.family.load_model(manifest.model).adapter.model.state_dict()
    ours = owner.binding.adapter(owner.transformer, manifest.model.get("options", {}), owner.pipe).model.state_dict()
    differ = sorted(set(theirs) ^ set(ours))
    if not differ:
        differ = [k for k in ours if theirs[k].shape != ours[k].shape
                  or not torch.equal(theirs[k].to(ours[k].device, ours[k].dtype), ours[k])]
    if differ:
        raise EngineMismatchError(f"{where} were built from other weights: expected those of {what}, got a "
                                  f"transformer whose {differ[0]} differs; rebuild them from this pipeline's transformer")


# --------------------------------------------------------------------------------------------
# one pipeline call


@dataclass(frozen=True)
class CallReport:
    """What ClusCa did in one pipeline call (``Enabled.last_call``).

    steps:       the planned steps (the scheduler's timesteps from the call's first one).
    served:      the transformer calls ClusCa ran (from step 0; the rest ran the original).
    step_counts: the kinds of the steps served (full, partial, forecast).
    config:      the ClusCa settings that ran (None if no step did).
    engine:      which engine ran them (``EngineInfo`` as text), None if none did.
    fallback:    why the original transformer ran from step ``served`` on, or None.
    seconds:     wall time of the served transformer calls; of that, ``start_seconds`` in the first
                 step's setup (making the engine where the call needs a new one, the plan, its draws,
                 the conditioning ahead) and ``graph_seconds`` in the engine's graphs; the rest is what
                 the wrapper adds per step (reading the call, moving rows, the output).
    """

    steps: int = 0
    served: int = 0
    step_counts: dict = field(default_factory=dict)
    config: ClusCaConfig | None = None
    engine: str | None = None
    fallback: str | None = None
    seconds: float = 0.0
    start_seconds: float = 0.0
    graph_seconds: float = 0.0

    @property
    def wrapper_seconds(self) -> float:
        """What the wrapper added to the served steps, in all (``seconds`` less setup and graphs)."""
        return self.seconds - self.start_seconds - self.graph_seconds


class _Run:
    """The state of one pipeline call: the step counter, its plan and denoiser, the conditioning ahead."""

    def __init__(self, owner: "Enabled"):
        self.owner = owner
        self.thread = threading.get_ident()
        self.step = 0
        self.fallback: str | None = None
        self.served: Served | None = None
        self.denoiser = None
        self.planned: list = []
        self.seconds = self.start_seconds = 0.0

    # -- the transformer's forward, step by step --------------------------------------------
    def forward(self, original, args: tuple, kwargs: dict, context: str | None):
        if self.fallback is not None:
            return original(*args, **kwargs)
        t0 = time.perf_counter()
        o = self.owner
        given = o.arguments(args, kwargs)
        if given is None:
            return original(*args, **kwargs)  # arguments the forward does not take: its own error
        if context not in (None, "cond"):
            return self.fall_back(f"a second transformer call per step (cache context {context!r}: true "
                                  f"classifier-free guidance?)", original, args, kwargs)
        call = o.binding.call(o.transformer, given, o.pipe)
        if isinstance(call, str):
            return self.fall_back(call, original, args, kwargs)
        if self.step == 0:
            reason = self.start(call)
            self.start_seconds = time.perf_counter() - t0
            if reason:
                return self.fall_back(reason, original, args, kwargs)
        elif call.key() != self.key:
            return self.fall_back("a call whose batch or shapes differ from the first step's", original, args, kwargs)
        if self.step >= len(self.planned):
            return self.fall_back(f"more transformer calls than the scheduler's {len(self.planned)} timesteps",
                                  original, args, kwargs)
        out = self.run_step(call)
        self.seconds += time.perf_counter() - t0
        return self.wrap(out, given.get("return_dict", True))

    def fall_back(self, reason: str, original, args, kwargs):
        self.fallback = reason
        log.warning("clusca_trt: %s; this pipeline call runs the original transformer from step %d on", reason, self.step)
        return original(*args, **kwargs)

    def wrap(self, out: torch.Tensor, return_dict: bool):
        return self.owner.output(sample=out) if return_dict else (out,)

    # -- the first step: engine, plan, conditioning ahead ----------------------------------
    def start(self, call) -> str | None:
        o = self.owner
        served, made = o.engines.get(call)
        if made:  # making an engine may touch the parameters' version counters: what we did, not the user
            o.fingerprint = Fingerprint.of(o.transformer)
        self.served = served
        spec = served.holder.spec
        self.spec = spec
        self.rows = row_map(call.rows, call.guided, o.binding.adapter_class.cfg_multiplier, spec.options.batch)
        ts = getattr(o.pipe.scheduler, "timesteps", None)
        if ts is None or len(ts) == 0:
            return "a scheduler without timesteps"
        self.tname = call.timestep
        self.dtypes = dtype = {t.name: t.dtype for t in spec.cond_inputs}
        first = self.host(call.cond[self.tname], dtype[self.tname])
        predicted = o.binding.timesteps(torch.as_tensor(ts), call.cond[self.tname]).detach().to("cpu", torch.float32)
        predicted = predicted.numpy().astype(NP_DTYPES[dtype[self.tname]])
        starts = [i for i, v in enumerate(predicted) if (first == v).all()]
        predicted = predicted[starts[0]:] if starts else predicted  # img2img starts later
        self.planned = served.holder.plan(len(predicted), served.config)
        keys = [(o.settings.seed, j) for j in range(spec.options.batch)]
        self.denoiser = served.holder.denoisers(self.planned, served.config, served.propagation)(keys)
        base = {t.name: self.host(call.cond[t.name], t.dtype) for t in spec.cond_inputs if t.name != self.tname}
        rows = spec.graph_batch
        self.ahead = [dict(base, **{self.tname: np.full(rows, v, predicted.dtype)}) for v in predicted]
        self.denoiser.condition(self.ahead)
        self.sources = {n: (call.cond[n], _version(call.cond[n])) for n in base}
        self.key = call.key()
        return None

    def host(self, t: torch.Tensor, dtype: str) -> np.ndarray:
        """A call's tensor on the host as the graphs take it (dtype), in the graph batch's rows."""
        a = t.detach().to("cpu", torch.int64 if dtype == "int64" else torch.float32).numpy()
        return a if self.rows.identity else a[self.rows.index]

    # -- every step ---------------------------------------------------------------------------
    def run_step(self, call) -> torch.Tensor:
        s = self.step
        self.check_conditioning(s, call)
        feeds = {t.name: self.host(call.model[t.name], t.dtype) for t in self.spec.model_inputs}
        out = self.denoiser(s, feeds)
        self.step += 1
        out = out if self.rows.identity else out[self.rows.back]
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=call.like.device, dtype=call.like.dtype)

    def check_conditioning(self, s: int, call) -> None:
        """The step's conditioning is what was computed ahead; where not (a callback changed the prompt
        embeddings, timesteps we did not foresee), the tables are computed again from this step on."""
        dtype = self.dtypes
        ahead = self.ahead[s]
        changed = {}
        t = self.host(call.cond[self.tname], dtype[self.tname])
        if not np.array_equal(t, ahead[self.tname]):
            changed[self.tname] = t
        for name, (ref, version) in self.sources.items():
            src = call.cond[name]
            if src is ref and version is not None and _version(src) == version:
                continue
            a = self.host(src, dtype[name])
            self.sources[name] = (src, _version(src))
            if not np.array_equal(a, ahead[name]):
                changed[name] = a
        if not changed:
            return
        log.debug("clusca_trt: step %d's conditioning (%s) differs from what was computed ahead; computing it again",
                  s, ", ".join(changed))
        rest = {n: a for n, a in changed.items() if n != self.tname}
        for j in range(s, len(self.ahead)):
            self.ahead[j] = dict(self.ahead[j], **rest)
        self.ahead[s] = dict(self.ahead[s], **changed)
        self.denoiser.condition(self.ahead)

    def report(self) -> CallReport:
        served = self.planned[: self.step]
        graphs = sum(sum(v) for v in self.denoiser.timings.values()) if self.denoiser is not None else 0.0
        return CallReport(
            steps=len(self.planned), served=self.step,
            step_counts={k.value: v for k, v in count_kinds(served).items()} if served else {},
            config=self.served.config if self.served and self.step else None,
            engine=str(self.served.holder.engine.info) if self.served and self.step else None,
            fallback=self.fallback, seconds=self.seconds, start_seconds=self.start_seconds, graph_seconds=graphs)


# --------------------------------------------------------------------------------------------
# the handle, the hook, the pipeline class


class Enabled:
    """What ``enable`` did to one pipeline (``enable`` returns it; ``enabled(pipe)`` finds it).

    family:    the model family (``clusca_trt.families``).
    settings:  the settings (``Settings``).
    last_call: a ``CallReport`` of the latest pipeline call (None before the first).
    """

    def __init__(self, pipe, family: Family, binding, settings: Settings, fingerprint: Fingerprint):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.family = family
        self.binding = binding
        self.settings = settings
        self.fingerprint = fingerprint
        params = inspect.signature(pipe.transformer.forward).parameters.values()
        self._positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        self._any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        self.output = Transformer2DModelOutput
        self.last_call: CallReport | None = None
        self._lock = threading.RLock()
        self._run: _Run | None = None
        self.engines = BuildEngines(self) if settings.engines is not None else TorchEngines(self)

    def arguments(self, args: tuple, kwargs: dict) -> dict | None:
        """A forward call's arguments by name, defaults filled (``inspect.Signature.bind`` without its cost);
        None where the forward does not take them."""
        named = self._positional[: len(args)]
        unknown = not self._any_keyword and not kwargs.keys() <= self._names
        if len(args) > len(self._positional) or unknown or any(n in kwargs for n in named):
            return None
        given = dict(self._defaults)
        given.update(zip(named, args))
        given.update(kwargs)
        return given

    def _call(self, original):
        """One pipeline call (``original()`` runs it), one at a time."""
        with self._lock:
            run = _Run(self)
            reason = self._check()
            if reason:
                run.fallback = reason
                log.warning("clusca_trt: %s; this pipeline call runs the original transformer", reason)
            self._run = run
            try:
                return original()
            finally:
                self._run = None
                self.last_call = run.report()

    def _forward(self, original, args, kwargs, context):
        run = self._run
        if run is None or run.thread != threading.get_ident():  # not from a pipeline call: unchanged
            return original(*args, **kwargs)
        return run.forward(original, args, kwargs, context)

    def _check(self) -> str | None:
        """Before a call: the transformer is still the one ``enable`` saw (or an error), or the reason to fall back."""
        if self.pipe.transformer is not self.transformer:
            raise ConfigError("the pipeline's transformer was replaced after clusca_trt.enable: expected the one it "
                              "hooked, got another; call clusca_trt.disable(pipe) and enable again")
        fp, old = Fingerprint.of(self.transformer), self.fingerprint
        again = "call clusca_trt.disable(pipe) and clusca_trt.enable(pipe, ...) again"
        if fp.names != old.names:
            raise EngineMismatchError(f"the transformer's modules changed after clusca_trt.enable (a LoRA loaded?): "
                                      f"expected the {len(old.names)} parameters enable saw, got {len(fp.names)} "
                                      f"others; {again}")
        if fp.hooks:
            raise ConfigError(f"diffusers hooks were added to the transformer after clusca_trt.enable: expected none "
                              f"besides ClusCa's, got {', '.join(fp.hooks)}; remove them or disable ClusCa")
        if fp.where != old.where:  # pipe.to(...): our step modules follow the transformer
            _check_transformer(self.transformer, fp)
            self.engines.moved()
            if isinstance(self.engines, TorchEngines):
                self.engines = TorchEngines(self)
            self.fingerprint = fp
        elif fp.values != old.values:
            raise EngineMismatchError(f"the transformer's weights changed after clusca_trt.enable (a LoRA fused or "
                                      f"weights loaded?): expected the weights enable saw, got others; {again}")
        if fp.processors != old.processors:
            return "the transformer's attention processors changed after clusca_trt.enable"
        return None


def _hook_class():
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs) -> None:
            pass

    class ClusCaHook(ModelHook):
        """The transformer's forward through ``Enabled._forward``. Stateful so that diffusers hands it the
        pipeline's cache context ("cond", "uncond"): a second call per step is not ClusCa's."""

        _is_stateful = True

        def __init__(self, owner: Enabled):
            super().__init__()
            self.owner = owner
            self.state_manager = StateManager(_NoState)

        def context(self) -> str | None:
            ctx = getattr(self.state_manager, "_context", None) or getattr(self.state_manager, "_current_context", None)
            return getattr(ctx, "name", ctx)

        def new_forward(self, module, *args, **kwargs):
            return self.owner._forward(self.fn_ref.original_forward, args, kwargs, self.context())

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    return ClusCaHook


_SUBCLASSES: dict[type, type] = {}
_SUBCLASSES_LOCK = threading.Lock()


def _enabled_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that runs each pipeline call through its ``Enabled`` (same name,
    module and qualified name, so ``save_pretrained`` and messages see the pipeline's own class)."""
    with _SUBCLASSES_LOCK:
        sub = _SUBCLASSES.get(cls)
        if sub is None:
            original = cls.__call__

            @functools.wraps(original)
            def __call__(self, *args, **kwargs):
                state = self.__dict__.get(STATE)
                if state is None:
                    return original(self, *args, **kwargs)
                return state._call(lambda: original(self, *args, **kwargs))

            sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__, "_clusca_trt_base": cls})
            _SUBCLASSES[cls] = sub
    return sub


# --------------------------------------------------------------------------------------------
# the public calls


def enable(
    pipe,
    *,
    method: str = "clusca",
    interval: int | None = None,
    clusters: int | None = None,
    propagation: float | None = None,
    order: int | None = None,
    warmup: int | None = None,
    fresh: str | None = None,
    update: str | None = None,
    correction: float | tuple[float, ...] | None = None,
    pair: bool | None = None,
    text_propagation: float | None = None,
    text_clusters: int | None = None,
    seed: int = 0,
    engines: str | Path | None = None,
    backend: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    verify: bool = True,
) -> Enabled:
    """Run ClusCa in ``pipe``'s transformer (a diffusers ``DiTPipeline``, ``FluxPipeline``,
    ``HunyuanVideoPipeline``, ...) until ``disable(pipe)``; the pipeline is used as before.

    ClusCa settings, named as ``Pipeline.generate`` names them (None: the family's defaults; with
    ``engines``: the build's): ``method`` (clusca, taylorseer, fora, full), ``interval`` N,
    ``clusters`` K (a build's must be its K), ``propagation`` gamma, ``order`` O, ``warmup`` W,
    ``fresh`` (random, nearest), ``update`` (paper, residual, step), ``correction`` (one share, or one
    per block), ``pair`` (guidance rows share their fresh tokens); FLUX and HunyuanVideo:
    ``text_propagation`` (gamma of the text tokens, 0 by default) and ``text_clusters`` (K of the text
    tokens: K, at most the text length);
    ``seed``: of ClusCa's own draws (sample ``j`` of a call has the key ``(seed, j)``).

    Where it runs: without ``engines``, our PyTorch step modules over the transformer's own weights,
    where the transformer is (``device``, ``precision``: none, or the transformer's). With
    ``engines=DIR`` a build (``clusca-trt build`` of this transformer's checkpoint), run by
    ``backend`` (``onnxruntime`` by default, ``torch``, ``tensorrt``, any ``Pipeline.load`` opens) on
    ``device`` in ``precision``; ``verify``: check the build's file hashes when opening it.

    Every setting and the transformer are checked before anything is changed (a one-line
    ``ConfigError`` / ``EngineMismatchError``); see the module docstring for what is refused and
    what falls back later. Returns the ``Enabled`` handle (``last_call`` reports each call)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "scheduler"):
        raise ConfigError(f"expected a diffusers pipeline with a transformer and a scheduler, got {type(pipe).__name__}")
    if STATE in getattr(pipe, "__dict__", {}):
        raise ConfigError("expected a pipeline without ClusCa, got one with it enabled; call clusca_trt.disable(pipe) first")
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and HOOK in registry.hooks:
        raise ConfigError("expected a transformer without ClusCa, got one enabled through another pipeline that "
                          "shares it; disable that pipeline first")
    family, binding = _family_of(transformer)
    if text_propagation is not None and "text_propagation" not in {f.name for f in family.inputs}:
        raise ConfigError(f"text_propagation applies to families with text tokens (FLUX, HunyuanVideo), got it for "
                          f"{family.label}")
    settings = Settings(method=method, interval=interval, clusters=clusters, propagation=propagation, order=order,
                        warmup=warmup, fresh=fresh, update=update, correction=correction, pair=pair,
                        text_propagation=text_propagation, text_clusters=text_clusters,
                        seed=seed, engines=engines, backend=backend, device=device, precision=precision, verify=verify)
    fingerprint = Fingerprint.of(transformer)
    _check_transformer(transformer, fingerprint)
    state = Enabled(pipe, family, binding, settings, fingerprint)  # opens and checks a build: may raise
    from diffusers.hooks.hooks import HookRegistry

    try:
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_hook_class()(state), HOOK)
    except Exception:
        state.engines.close()
        raise
    state._class = type(pipe)
    object.__setattr__(pipe, "__class__", _enabled_class(type(pipe)))
    pipe.__dict__[STATE] = state
    log.info("clusca_trt: %s enabled on %s (%s)", settings.method.value, type(pipe).__name__,
             f"engines {settings.engines}" if settings.engines else "our step modules")
    return state


def disable(pipe) -> None:
    """Undo ``enable``: the transformer's own forward, the pipeline's own class, the engines freed.
    Waits for a pipeline call in progress. Raises a ``ConfigError`` where ClusCa is not enabled."""
    state = getattr(pipe, "__dict__", {}).get(STATE)
    if state is None:
        raise ConfigError("expected a pipeline with ClusCa enabled (clusca_trt.enable), got one without")
    from diffusers.hooks.hooks import HookRegistry

    with state._lock:
        HookRegistry.check_if_exists_or_initialize(state.transformer).remove_hook(HOOK, recurse=False)
        object.__setattr__(pipe, "__class__", state._class)
        del pipe.__dict__[STATE]
        state.engines.close()


def enabled(pipe) -> Enabled | None:
    """The ``Enabled`` handle of ``pipe``, or None where ClusCa is not enabled on it."""
    return getattr(pipe, "__dict__", {}).get(STATE)
