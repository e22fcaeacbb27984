"""What ``clusca-trt serve`` accepts and answers, without Ray: a POST /generate body -> a validated
``GenerateRequest``, its batching key, the ``Pipeline.generate`` arguments of a batch; one-line errors.

Every field is checked before a request is admitted: unknown fields, JSON types (a bool is not an
integer, NaN is not a number, a key may not repeat), ranges. The ClusCa settings are resolved against
the build by the library (``ClusCaConfig.for_method``, as ``Pipeline.generate`` resolves them), so
requests that ask for the same run in other words (``interval`` left out or set to the default) get
one key and can share an engine run.

A batch concatenates its requests' samples with each request's own keys ``(seed, 0..n-1)``: each
sample's noise and ClusCa draws come from its key alone, so a request's rows of the batch equal
``Pipeline.generate(**request.generate_arguments())`` alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..config import MAX_SEED, ClusCaConfig, FreshPolicy, Method, is_int
from ..engines.manifest import Manifest
from ..errors import ConfigError, InputError
from ..fields import check_labels
from ..runtime.driver import SampleKey, sample_keys
from ..runtime.samplers import SAMPLERS, GaussianDiffusion

FAMILIES = ("dit", "flux")
FORMATS = ("npz", "png")
MAX_STEPS = 1000  # steps of one request: a server bound, below the library's schedule.MAX_STEPS
MEDIA_TYPES = {"npz": "application/x-npz", "png": "image/png"}

COMMON_FIELDS = ("seed", "steps", "method", "interval", "propagation", "order", "warmup", "fresh", "format")
FAMILY_FIELDS = {
    "dit": ("class_labels", "sampler", "cfg_scale"),
    "flux": ("prompt", "prompt_embeds", "pooled_prompt_embeds", "guidance_scale", "text_propagation"),
}
FLUX_EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")


class BadRequest(InputError):
    """A request the server refuses as it stands (HTTP 400)."""


def one_line(message: object) -> str:
    """The first non-empty line of ``message`` (an exception or text), at most 500 characters."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else (type(message).__name__ if isinstance(message, BaseException) else "error")
    return text if len(text) <= 500 else text[:497] + "..."


def error_body(message: object) -> dict:
    """Every error answer's JSON: ``{"error": "<one line>"}``."""
    return {"error": one_line(message)}


@dataclass(frozen=True)
class ModelInfo:
    """What checking a request needs to know of a build: its manifest alone (no engine sessions)."""

    family: str
    batch: int  # samples per engine call (the build's --batch)
    built_clusters: int  # 0 where the graphs cluster no tokens
    built_order: int
    defaults: ClusCaConfig
    sampling: dict  # the manifest's model.sampling
    decoded: bool  # a decoder exists: png output is possible
    text_encoders: bool  # FLUX: the source folder had text encoders (prompts accepted)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ModelInfo":
        family = manifest.model["family"]
        if family not in FAMILIES:
            raise ConfigError(f"clusca-trt serve runs {' and '.join(FAMILIES)} engines, got a {family} build")
        spec = manifest.spec
        return cls(
            family=family,
            batch=spec.options.batch,
            built_clusters=spec.options.clusters if spec.clustered_groups else 0,
            built_order=spec.options.order,
            defaults=ClusCaConfig(**manifest.defaults) if manifest.defaults else ClusCaConfig(),
            sampling=dict(manifest.model.get("sampling") or {}),
            decoded=bool(manifest.data.get("decoder")),
            text_encoders=bool(manifest.model.get("source", {}).get("pipeline")),
        )

    @property
    def fields(self) -> tuple[str, ...]:
        return COMMON_FIELDS + FAMILY_FIELDS[self.family]

    @property
    def default_steps(self) -> int:
        return int(self.sampling.get("default_steps", 50)) if self.family == "flux" else 50


@dataclass(frozen=True, eq=False)
class GenerateRequest:
    """One validated POST /generate. ``config`` is resolved against the build; ``sampling`` holds the
    family's sampler settings (DiT: sampler, cfg_scale; FLUX: guidance_scale, text_propagation);
    exactly one of ``labels`` (DiT), ``prompts`` or ``embeds`` (FLUX) is set."""

    seed: int
    steps: int
    config: ClusCaConfig
    sampling: tuple[tuple[str, object], ...]
    format: str
    labels: tuple[int, ...] | None = None
    prompts: tuple[str, ...] | None = None
    embeds: dict[str, np.ndarray] | None = None

    @property
    def kind(self) -> str:
        return "labels" if self.labels is not None else "prompts" if self.prompts is not None else "embeds"

    @property
    def samples(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        if self.prompts is not None:
            return len(self.prompts)
        return len(self.embeds[FLUX_EMBEDS[0]])

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one engine run."""
        return (self.kind, self.steps, self.config, self.sampling)

    @property
    def keys(self) -> list[SampleKey]:
        """The sample keys of this request: ``(seed, 0) .. (seed, n - 1)``, as ``generate(seed=...)`` gives."""
        return sample_keys(self.seed, self.samples)

    def generate_arguments(self) -> dict:
        """The ``Pipeline.generate`` keyword arguments of this request run alone."""
        return dict(_inputs([self]), seed=self.seed, **_settings(self))


def batch_arguments(requests: list[GenerateRequest]) -> dict:
    """The ``Pipeline.generate`` keyword arguments of one run of ``requests`` (all with one ``key``):
    their samples concatenated, each with its own request's keys."""
    if len({r.key for r in requests}) != 1:
        raise ConfigError(f"expected requests with one batching key, got {len({r.key for r in requests})} keys")
    return dict(_inputs(requests), keys=[k for r in requests for k in r.keys], **_settings(requests[0]))


def _inputs(requests: list[GenerateRequest]) -> dict:
    first = requests[0]
    if first.labels is not None:
        return {"class_labels": [v for r in requests for v in r.labels]}
    if first.prompts is not None:
        return {"prompt": [p for r in requests for p in r.prompts]}
    return {name: np.concatenate([r.embeds[name] for r in requests]) for name in FLUX_EMBEDS}


def _settings(request: GenerateRequest) -> dict:
    c = request.config
    return dict(request.sampling, steps=request.steps, method=c.method.value, interval=c.interval,
                propagation=c.propagation, order=c.order, warmup=c.warmup, fresh=c.fresh.value)


# ------------------------------------------------------------------------------------------------
# parsing


def parse_request(raw: bytes, model: ModelInfo, max_samples: int) -> GenerateRequest:
    """A POST /generate body -> a ``GenerateRequest``, or ``BadRequest``/``ConfigError``/``InputError``
    (HTTP 400) with a one-line message. ``max_samples``: the most samples one request may ask for."""
    body = _json_object(raw)
    unknown = sorted(set(body) - set(model.fields))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} for a {model.family} model; expected some of "
                         f"{', '.join(model.fields)}")
    get = _Fields(body)
    steps = get.integer("steps", model.default_steps, 1, MAX_STEPS)
    config = ClusCaConfig.for_method(
        get.choice("method", model.defaults.method.value, [m.value for m in Method]),  # the build's default
        built_clusters=model.built_clusters,
        built_order=model.built_order,
        defaults=model.defaults,
        interval=get.integer("interval", None, 1),
        propagation=get.number("propagation", None, 0.0, 1.0),
        order=get.integer("order", None, 0),
        warmup=get.integer("warmup", None, 1),
        fresh=get.choice("fresh", None, [p.value for p in FreshPolicy]),
    )
    fmt = get.choice("format", "npz", FORMATS)
    if fmt == "png" and not model.decoded:
        raise BadRequest("format png needs a model with a decoder (VAE or pixel space), got latents only; use npz")
    common = dict(seed=get.integer("seed", 0, 0, MAX_SEED), steps=steps, config=config, format=fmt)
    if model.family == "dit":
        request = _dit_request(get, model, common)
    else:
        request = _flux_request(get, model, common)
    if request.samples > max_samples:
        raise BadRequest(f"expected at most {max_samples} samples per request, got {request.samples}")
    return request


def _dit_request(get: "_Fields", model: ModelInfo, common: dict) -> GenerateRequest:
    labels = get.body.get("class_labels")
    if labels is None:
        raise BadRequest("expected class_labels (a non-empty list of integers) for a dit model, got none")
    if not isinstance(labels, list) or not all(is_int(v) for v in labels):
        raise BadRequest(f"class_labels: expected a list of integers, got {_show(labels)}")
    labels = check_labels(labels, model.sampling["num_classes"])  # the runtime's own check: range, non-empty
    sampler = get.choice("sampler", "ddim", SAMPLERS)
    GaussianDiffusion(common["steps"], sampler)  # the sampler's own check of the step count
    sampling = (("sampler", sampler), ("cfg_scale", get.number("cfg_scale", 1.5)))
    return GenerateRequest(labels=tuple(labels), sampling=sampling, **common)


def _flux_request(get: "_Fields", model: ModelInfo, common: dict) -> GenerateRequest:
    s = model.sampling
    sampling = (("guidance_scale", get.number("guidance_scale", 3.5)),
                ("text_propagation", get.number("text_propagation", 0.0, 0.0, 1.0)))
    given = [n for n in ("prompt", *FLUX_EMBEDS) if get.body.get(n) is not None]
    if "prompt" in given:
        if len(given) > 1:
            raise BadRequest("expected either prompt or prompt_embeds with pooled_prompt_embeds, got both")
        prompt = get.body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise BadRequest(f"prompt: expected a non-empty string or list of them, got {_show(prompt)}")
        if not model.text_encoders:
            raise BadRequest("prompt: these engines were built without text encoders beside them; "
                             "send prompt_embeds and pooled_prompt_embeds")
        return GenerateRequest(prompts=tuple(prompts), sampling=sampling, **common)
    if len(given) != 2:
        missing = [n for n in FLUX_EMBEDS if n not in given]
        raise BadRequest(f"expected prompt, or prompt_embeds with pooled_prompt_embeds, got no {missing[0]}")
    embeds = {
        "prompt_embeds": _array("prompt_embeds", get.body["prompt_embeds"], (s["text_length"], s["text_dim"])),
        "pooled_prompt_embeds": _array("pooled_prompt_embeds", get.body["pooled_prompt_embeds"], (s["pooled_dim"],)),
    }
    rows = {n: len(a) for n, a in embeds.items()}
    if len(set(rows.values())) != 1:
        raise BadRequest(f"pooled_prompt_embeds: expected {rows['prompt_embeds']} rows like prompt_embeds, "
                         f"got {rows['pooled_prompt_embeds']}")
    return GenerateRequest(embeds=embeds, sampling=sampling, **common)


def _array(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    """Nested JSON lists of numbers -> float32 [n, *shape] (n >= 1)."""
    want = "[n, " + ", ".join(str(d) for d in shape) + "]"
    try:
        a = np.array(value)
    except ValueError:  # ragged lists
        a = None
    if a is None or a.dtype.kind not in "iuf" or a.ndim != len(shape) + 1 or a.shape[1:] != shape or not len(a):
        got = f"shape {list(a.shape)} of {a.dtype}" if a is not None else "ragged lists"
        raise BadRequest(f"{name}: expected numbers {want}, got {got}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise BadRequest(f"{name}: expected finite numbers, got inf or values out of float32 range")
    return a


def _json_object(raw: bytes) -> dict:
    def no_constants(name):
        raise BadRequest(f"body: expected finite numbers, got {name}")

    def no_repeats(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise BadRequest(f"body: field {k!r} appears twice")
            seen[k] = v
        return seen

    try:
        body = json.loads(raw, parse_constant=no_constants, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise BadRequest(f"body: expected a JSON object, got invalid JSON ({e.msg} at line {e.lineno} "
                         f"column {e.colno})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"body: expected a JSON object, got {type(e).__name__}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _show(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed getters over a JSON object; ``null`` is the default."""

    def __init__(self, body: dict):
        self.body = body

    def integer(self, name: str, default, lo: int | None = None, hi: int | None = None):
        v = self.body.get(name)
        if v is None:
            return default
        if not is_int(v):
            raise BadRequest(f"{name}: expected an integer, got {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise BadRequest(f"{name}: expected an integer {span}, got {v}")
        return v

    def number(self, name: str, default, lo: float | None = None, hi: float | None = None):
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRequest(f"{name}: expected a number, got {_show(v)}")
        try:
            v = float(v)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
            raise BadRequest(f"{name}: expected a finite number{span}, got {self.body[name]}")
        return v

    def choice(self, name: str, default, choices):
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str) or v not in choices:
            raise BadRequest(f"{name}: expected one of {', '.join(choices)}, got {_show(v)}")
        return v
