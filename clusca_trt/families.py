"""The model families, one registry entry each: ``FAMILIES[name]`` is everything the package knows
of a family, and nothing else keeps a list of them.

A family is
* a model module in ``models/`` (its configs and named configs, ``model_names()``, the loader
  ``load(name, checkpoint, random_init, seed, **options) -> LoadedModel``, the adapter with
  ``forward_step`` / ``conditioning`` / ``export_spec``, ``probe_adapter`` for FLOPs counts);
* a runtime module in ``runtime/`` (``generate(pipe, config, **inputs) -> GenerateResult``: its
  sampler, guidance, latents and prompts);
* one ``Family`` entry here: its name and label, those two modules, the inputs its sampling takes
  (one schema, ``fields.Field``, that ``Pipeline.generate``, the CLI's options and the server's
  request fields read), its default steps, the sampling facts its manifests hold, whether the
  server runs it.

The entry names its modules by their fixed import paths in this package; ``Family.model()`` and
``Family.runtime()`` import them when first used (an engine directory never names code: the
family is chosen by its name, from this table). ``tests/test_layout.py`` checks that the paths
point into ``models/`` and ``runtime/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from .errors import ConfigError, EngineMismatchError, InputError
from .fields import COMMON, STEPS, Field

MODELS = "clusca_trt.models"  # model loading by name (``load_model``, ``load_from_manifest``)


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring).

    name:           the manifest's ``model.family``.
    label:          how messages name it.
    model_module:   its module in ``models/``.
    runtime_module: its module in ``runtime/``.
    inputs:         what its sampling takes besides ``fields.COMMON`` (seed, steps, keys, progress);
                    the first is the one ``Pipeline.generate`` also takes positionally.
    default_steps:  sampling steps when none are given; ``steps_fact``: the sampling fact that
                    says it instead where the model knows (FLUX: 50 for dev, 4 for schnell).
    sampling_facts: what its manifests' ``model.sampling`` must hold: (key, JSON type name).
    decoders:       the decoder kinds its builds may name (``runtime/decode.py``); none: latents only.
    servable:       whether ``clusca-trt serve`` runs its builds.
    """

    name: str
    label: str
    model_module: str
    runtime_module: str
    inputs: tuple[Field, ...]
    default_steps: int = 50
    steps_fact: str | None = None
    sampling_facts: tuple[tuple[str, str], ...] = ()
    decoders: tuple[str, ...] = ()
    servable: bool = True

    @property
    def primary(self) -> Field:
        return self.inputs[0]

    @property
    def fields(self) -> tuple[Field, ...]:
        """Every input of its sampling: the common ones, then its own."""
        return COMMON + self.inputs

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def model(self) -> ModuleType:
        """Its model module (imported now if it was not)."""
        return importlib.import_module(self.model_module)

    def load_model(self, model: dict):
        """The model a manifest's ``model`` entry records (a ``LoadedModel``: by its name's loader in this
        family's model module, checked against the recorded source's sha256): the torch backend's."""
        if model.get("family") != self.name:
            raise EngineMismatchError(f"expected a {self.name} model entry, got family {model.get('family')!r}")
        return importlib.import_module(MODELS).load_from_manifest(model)

    def runtime(self) -> ModuleType:
        """Its runtime module (imported now if it was not)."""
        return importlib.import_module(self.runtime_module)

    def steps(self, sampling: dict) -> int:
        """The default sampling steps of a build with these sampling facts."""
        if self.steps_fact and isinstance(sampling.get(self.steps_fact), int):
            return sampling[self.steps_fact]
        return self.default_steps

    def resolve(self, args: tuple, kwargs: dict, sampling: dict) -> dict:
        """The family inputs of one ``generate`` call, each checked and defaults filled in: at most one
        positional argument (the primary input), every keyword one of ``fields``."""
        if len(args) > 1:
            raise InputError(f"generate takes one positional argument ({self.primary.name}), got {len(args)}; "
                             f"pass the others by keyword")
        given = dict(kwargs)
        if args:
            if self.primary.name in given:
                raise InputError(f"{self.primary.name} given twice: positionally and by keyword")
            given[self.primary.name] = args[0]
        names = [f.name for f in self.fields]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InputError(f"unknown argument {unknown[0]!r} for a {self.name} model; expected some of "
                             f"{', '.join(names)}")
        out = {}
        for f in self.fields:
            value = given.get(f.name)
            if value is None:
                if f.required:
                    raise InputError(f"expected {f.name} for a {self.name} model, got none")
                value = self.steps(sampling) if f is STEPS else f.default
            else:
                value = f.check(value, sampling)
            out[f.name] = value
        return out

    def generate(self, pipe, config, inputs: dict):
        """Sample with the family's runtime: ``inputs`` as ``resolve`` returns them."""
        return self.runtime().generate(pipe, config, **inputs)


_GUIDANCE = "Distilled guidance scale fed to the model (no second pass)."
_TEXT_GAMMA = Field("text_propagation", "number", "gamma of the text tokens (0: scatter only, as the reference).",
                    default=0.0, low=0.0, high=1.0, cli=("--text-propagation",), error=ConfigError)
_PROMPT = Field("prompt", "prompts", "A prompt (repeat the flag for several images).", cli=("--prompt", "-p"))
_ENCODERS = Field("encoders", "path", "The pipeline folder with the text encoders [default: the engines' source].",
                  http=False)
_TEXT_FACTS = (("text_length", "int"), ("text_dim", "int"), ("pooled_dim", "int"), ("guidance_embeds", "bool"),
               ("scheduler", "object"))

DIT = Family(
    name="dit",
    label="DiT",
    model_module="clusca_trt.models.dit",
    runtime_module="clusca_trt.runtime.dit",
    inputs=(
        Field("class_labels", "labels", "Comma-separated class labels [default: 0..batch-1].", required=True,
              cli=("--class-labels",)),
        Field("sampler", "choice", "Sampler.", default="ddim", choices=("ddim", "ddpm"), cli=("--sampler",),
              error=ConfigError),
        Field("cfg_scale", "number", "Classifier-free guidance scale.", default=1.5, cli=("--cfg-scale",)),
    ),
    sampling_facts=(("num_classes", "int"), ("latent_shape", "list")),
    decoders=("pixels", "vae"),
)

FLUX = Family(
    name="flux",
    label="FLUX",
    model_module="clusca_trt.models.flux",
    runtime_module="clusca_trt.runtime.flux",
    inputs=(
        _PROMPT,
        Field("prompt_embeds", "array", "T5 embeddings [n, text_length, T5 dim] instead of prompts.",
              shape=("text_length", "text_dim")),
        Field("pooled_prompt_embeds", "array", "CLIP pooled embeddings [n, CLIP dim], with prompt_embeds.",
              shape=("pooled_dim",)),
        Field("guidance_scale", "number", _GUIDANCE + " [default: FLUX 3.5, HunyuanVideo 6.0]", default=3.5,
              cli=("--guidance",)),
        _TEXT_GAMMA,
        _ENCODERS,
    ),
    steps_fact="default_steps",
    sampling_facts=(("height", "int"), ("width", "int"), ("vae_scale_factor", "int"), ("latent_channels", "int"),
                    ("latent_size", "list"), ("image_tokens", "int"), ("default_steps", "int"), *_TEXT_FACTS),
    decoders=("vae",),
)

HUNYUAN_VIDEO = Family(
    name="hunyuan-video",
    label="HunyuanVideo",
    model_module="clusca_trt.models.hunyuan_video",
    runtime_module="clusca_trt.runtime.hunyuan_video",
    inputs=(
        _PROMPT,
        Field("prompt_embeds", "array", "Llama embeddings [n, text_length, Llama dim] instead of prompts.",
              shape=("text_length", "text_dim")),
        Field("pooled_prompt_embeds", "array", "CLIP pooled embeddings [n, CLIP dim], with prompt_embeds.",
              shape=("pooled_dim",)),
        Field("prompt_attention_mask", "array", "The text mask [n, text_length], with prompt_embeds.",
              shape=("text_length",)),
        Field("guidance_scale", "number", _GUIDANCE + " [default: FLUX 3.5, HunyuanVideo 6.0]", default=6.0,
              cli=("--guidance",)),
        _TEXT_GAMMA,
        _ENCODERS,
    ),
    sampling_facts=(("latent_shape", "list"), *_TEXT_FACTS),
    decoders=("video-vae",),
    servable=False,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DIT, FLUX, HUNYUAN_VIDEO)}


def family(name: str) -> Family:
    """The registered family ``name``, or a one-line ``ConfigError``."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ConfigError(f"model family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def cli_fields() -> dict[str, Field]:
    """Every family input that is a CLI option, by name (a field several families share once: the
    first family's; they agree on kind and flags)."""
    out: dict[str, Field] = {}
    for fam in FAMILIES.values():
        for f in fam.inputs:
            if f.cli and f.name not in out:
                out[f.name] = f
    return out
