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

import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import numpy as np

from ..config import ClusCaConfig, FreshPolicy, Method, is_int
from ..engines.manifest import Manifest
from ..errors import ConfigError, InputError
from ..families import FAMILIES, Family
from ..fields import COMMON, SEED, Field, check_labels, row_shape
from ..runtime.compare import available_methods
from ..runtime.denoiser import SampleKey, sample_keys
from ..runtime.samplers import GaussianDiffusion

SERVED = tuple(f.name for f in FAMILIES.values() if f.servable)  # the families the server runs
FORMATS = ("npz", "png")
MAX_STEPS = 1000  # steps of one request: a server bound, below the library's schedule.MAX_STEPS
MEDIA_TYPES = {"npz": "application/x-npz", "png": "image/png"}

SETTINGS_FIELDS = ("interval", "propagation", "order", "warmup", "fresh")  # the caching settings; full takes none
# every family's fields: the common inputs of the registry's schema, the ClusCa settings, the output format
COMMON_FIELDS = (*(f.name for f in COMMON if f.http), "method", *SETTINGS_FIELDS, "format")
# the page (GET /): how its form reads a field of each schema kind (others: a JSON number); the prompt it starts with
PAGE_KINDS = {"labels": "list", "prompts": "text", "choice": "choice"}
PAGE_PROMPT = "a red apple on a wooden table"


class BadRequest(InputError):
    """A request the server refuses as it stands (HTTP 400)."""


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
        if family not in SERVED:
            raise ConfigError(f"clusca-trt serve runs {' and '.join(SERVED)} engines, got a {family} build")
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
    def entry(self) -> Family:
        """The family's registry entry: its inputs (the request fields), defaults and ranges."""
        return FAMILIES[self.family]

    @property
    def inputs(self) -> tuple[Field, ...]:
        """The family's inputs a request may carry, the primary first."""
        return tuple(f for f in self.entry.inputs if f.http)

    @property
    def fields(self) -> tuple[str, ...]:
        return COMMON_FIELDS + tuple(f.name for f in self.inputs)

    @property
    def default_steps(self) -> int:
        return self.entry.steps(self.sampling)


@dataclass(frozen=True, eq=False)
class GenerateRequest:
    """One validated POST /generate. ``config`` is resolved against the build; ``sampling`` holds the
    family's other scalar inputs (DiT: sampler, cfg_scale; FLUX: guidance_scale, text_propagation);
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
        return len(next(iter(self.embeds.values())))

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
    return {name: np.concatenate([r.embeds[name] for r in requests]) for name in first.embeds}


def _settings(request: GenerateRequest) -> dict:
    c = request.config
    return dict(request.sampling, steps=request.steps, method=c.method.value, interval=c.interval,
                propagation=c.propagation, order=c.order, warmup=c.warmup, fresh=c.fresh.value)


# ------------------------------------------------------------------------------------------------
# parsing


def parse_request(raw: bytes, model: ModelInfo, max_samples: int) -> GenerateRequest:
    """A POST /generate body -> a ``GenerateRequest``, or ``BadRequest``/``ConfigError``/``InputError``
    (HTTP 400) with a one-line message. ``max_samples``: the most samples one request may ask for."""
    return _request(_json_object(raw), model, max_samples)


def _request(body: dict, model: ModelInfo, max_samples: int) -> GenerateRequest:
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
    common = dict(seed=get.integer("seed", SEED.default, int(SEED.low), int(SEED.high)), steps=steps, config=config,
                  format=fmt, sampling=_scalars(get, model.inputs[1:]))
    if model.inputs[0].kind == "labels":
        request = _labels_request(get, model, common)
    else:
        request = _prompts_request(get, model, common)
    if request.samples > max_samples:
        raise BadRequest(f"expected at most {max_samples} samples per request, got {request.samples}")
    return request


def parse_compare(raw: bytes, model: ModelInfo, max_samples: int) -> list[GenerateRequest]:
    """A POST /compare body (a /generate body without ``method`` and ``format``) -> one npz request per
    method the build runs (``available_methods``), full first: the caching methods take the body's
    ClusCa settings (FORA all but ``order``), full none of them (as ``generate --compare``)."""
    body = _json_object(raw)
    methods = available_methods(model.built_clusters > 0, model.built_order)
    for name in ("method", "format"):
        if body.get(name) is not None:
            raise BadRequest(f"{name}: expected none in a /compare body (it runs {', '.join(methods)} and answers "
                             f"JSON), got {_show(body[name])}")
    if not model.decoded:
        raise BadRequest("compare needs a model with a decoder (VAE or pixel space) to compare images, got latents "
                         "only")
    requests = []
    for method in methods:
        drop = SETTINGS_FIELDS if method == "full" else ("order",) if method == "fora" else ()
        requests.append(_request(dict({k: v for k, v in body.items() if k not in drop}, method=method,
                                      format="npz"), model, max_samples))
    return requests


def page_form(model: ModelInfo) -> dict:
    """What the page (GET /) shows for this build: its form's fields in order, each with how it is typed
    in (``PAGE_KINDS``), its choices and its default (what ``parse_request`` resolves for a body that
    leaves it out; the family's example input), and the methods /compare runs."""
    methods = available_methods(model.built_clusters > 0, model.built_order, tuple(m.value for m in Method))
    example = _example(model, 4)
    resolved = _request(dict(example, method=methods[0]), dataclasses.replace(model, text_encoders=True), 4)
    c = resolved.config
    defaults = dict(example, seed=resolved.seed, steps=resolved.steps, method=c.method.value, interval=c.interval,
                    propagation=c.propagation, order=c.order, warmup=c.warmup, fresh=c.fresh.value,
                    **dict(resolved.sampling))
    kinds = {f.name: f for f in model.inputs if f.kind != "array"}
    choices = {"method": methods, "fresh": [p.value for p in FreshPolicy],
               **{f.name: list(f.choices) for f in kinds.values() if f.kind == "choice"}}
    order = [f for f in kinds if f in example] + [f for f in COMMON_FIELDS if f != "format"] + \
            [f for f in kinds if f not in example]
    fields = [{"name": f, "default": defaults[f],
               "kind": PAGE_KINDS.get(kinds[f].kind if f in kinds else "choice" if f in choices else "", "number"),
               **({"choices": choices[f]} if f in choices else {})} for f in order]
    return {"family": model.family, "fields": fields, "compare_methods": available_methods(
        model.built_clusters > 0, model.built_order), "images": model.decoded,
        "prompts": model.inputs[0].kind != "prompts" or model.text_encoders}


def _example(model: ModelInfo, samples: int) -> dict:
    """The page's and the warm-up's example input: the first class labels, or a prompt."""
    primary = model.inputs[0]
    if primary.kind == "labels":
        return {primary.name: list(range(min(samples, model.sampling["num_classes"])))}
    return {primary.name: PAGE_PROMPT}


def warmup_requests(model: ModelInfo, steps: int = 8) -> list[GenerateRequest]:
    """One short one-sample request per method the build runs (the page's example input, ``steps``
    steps at most): a replica runs them once as it starts, so that no answer, and no /compare timing,
    pays for a graph's first call (ONNX Runtime initialises lazily). None for FLUX engines without
    text encoders (they take embeddings only)."""
    if model.inputs[0].kind == "prompts" and not model.text_encoders:
        return []
    example = _example(model, 1)
    steps = min(steps, model.default_steps)
    return [_request(dict(example, method=m, steps=steps), model, 1)
            for m in available_methods(model.built_clusters > 0, model.built_order)]


def _scalars(get: "_Fields", inputs: tuple[Field, ...]) -> tuple[tuple[str, object], ...]:
    """The family's scalar inputs of a request (numbers, integers, choices), by the schema's
    defaults and ranges."""
    out = []
    for f in inputs:
        if f.kind == "number":
            out.append((f.name, get.number(f.name, f.default, f.low, f.high)))
        elif f.kind == "int":
            out.append((f.name, get.integer(f.name, f.default, f.low, f.high)))
        elif f.kind == "choice":
            out.append((f.name, get.choice(f.name, f.default, f.choices)))
    return tuple(out)


def _labels_request(get: "_Fields", model: ModelInfo, common: dict) -> GenerateRequest:
    name = model.inputs[0].name
    labels = get.body.get(name)
    if labels is None:
        raise BadRequest(f"expected {name} (a non-empty list of integers) for a {model.family} model, got none")
    if not isinstance(labels, list) or not all(is_int(v) for v in labels):
        raise BadRequest(f"{name}: expected a list of integers, got {_show(labels)}")
    labels = check_labels(labels, model.sampling["num_classes"])  # the runtime's own check: range, non-empty
    sampler = dict(common["sampling"]).get("sampler")
    if sampler is not None:
        GaussianDiffusion(common["steps"], sampler)  # the sampler's own check of the step count
    return GenerateRequest(labels=tuple(labels), **common)


def _prompts_request(get: "_Fields", model: ModelInfo, common: dict) -> GenerateRequest:
    prompt_field = model.inputs[0].name
    arrays = [f for f in model.inputs if f.kind == "array"]
    names = [f.name for f in arrays]
    with_embeds = f"{names[0]} with {' and '.join(names[1:])}"
    given = [n for n in (prompt_field, *names) if get.body.get(n) is not None]
    if prompt_field in given:
        if len(given) > 1:
            raise BadRequest(f"expected either {prompt_field} or {with_embeds}, got both")
        prompt = get.body[prompt_field]
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise BadRequest(f"{prompt_field}: expected a non-empty string or list of them, got {_show(prompt)}")
        if not model.text_encoders:
            raise BadRequest(f"{prompt_field}: these engines were built without text encoders beside them; "
                             f"send {' and '.join(names)}")
        return GenerateRequest(prompts=tuple(prompts), **common)
    if len(given) != len(names):
        missing = [n for n in names if n not in given]
        raise BadRequest(f"expected {prompt_field}, or {with_embeds}, got no {missing[0]}")
    embeds = {f.name: _array(f.name, get.body[f.name], row_shape(f, model.sampling)) for f in arrays}
    rows = {n: len(a) for n, a in embeds.items()}
    for n in names[1:]:
        if rows[n] != rows[names[0]]:
            raise BadRequest(f"{n}: expected {rows[names[0]]} rows like {names[0]}, got {rows[n]}")
    return GenerateRequest(embeds=embeds, **common)


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
    except ValueError as e:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(f"body: expected integers of at most {sys.get_int_max_str_digits()} digits, got a longer "
                         "one") from None
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
