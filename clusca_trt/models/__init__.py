"""Model loading by name: ``load_model`` turns a name plus a checkpoint (or ``random_init``) into
an adapter the exporter and the torch backend use.

The families are ``clusca_trt.families.FAMILIES``; each family's model module here has
``model_names()`` (the ``--model`` names it serves) and ``load(name, checkpoint, random_init, seed,
**options) -> LoadedModel``, and is imported only when one of its names is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ..config import MAX_SEED
from ..errors import ConfigError, EngineMismatchError
from ..families import FAMILIES, family

log = logging.getLogger(__name__)

DEFAULT_MODEL = "dit-digits"  # the built-in trained model (weights in clusca_trt/data)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to export.

    model_config: the architecture (JSON-able; recorded in the manifest and the cache key).
    options:      family build options (resolution, text length, ...), passed back to ``load``.
    source:       kind, path, sha256 or seed: what the engines are built from.
    decoder:      how outputs become images (None: latents only), e.g. {"kind": "pixels"}.
    build_name:   where a model has several builds (FLUX: one per resolution), each goes to
                  ``<engine dir>/<build_name>`` so that they share one engine directory; None:
                  the engine directory is the build.
    """

    name: str
    family: str
    adapter: object
    model_config: dict
    source: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    decoder: dict | None = None
    build_name: str | None = None


def family_module(name: str):
    """The model module of family ``name``."""
    return family(name).model()


def _name_index() -> dict[str, str]:
    index = {}
    for fam in FAMILIES.values():
        for name in fam.model().model_names():
            index[name] = fam.name
    return index


def model_names() -> list[str]:
    return list(_name_index())


def family_of(name: str) -> str:
    index = _name_index()
    if not isinstance(name, str) or name not in index:
        raise ConfigError(f"model must be one of {', '.join(index)}, got {name!r}")
    return index[name]


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint=None,
    random_init: bool = False,
    seed: int = 0,
    **options,
) -> LoadedModel:
    """Load ``name`` from ``checkpoint`` (a file or a diffusers folder), or with random weights.

    ``options`` are family build options (e.g. FLUX's height/width); unset ones are dropped.
    Every floating tensor of the loaded model is checked finite once (a NaN weight makes NaN engines)."""
    from .checks import check_weights

    family = family_of(name)
    if checkpoint is not None and random_init:
        raise ConfigError("give either a checkpoint or random_init, got both")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    options = {k: v for k, v in options.items() if v is not None}
    loaded = family_module(family).load(name, checkpoint=checkpoint, random_init=random_init, seed=seed, **options)
    check_weights(loaded.adapter, f"model {name}" + (f" from {checkpoint}" if checkpoint is not None else ""))
    return loaded


def load_from_manifest(model: dict) -> LoadedModel:
    """The model a manifest's ``model`` entry was built from, by its name's family loader (the
    manifest names no code), checked against the recorded sha256 and architecture (the torch
    backend's model: one that differs from the one the graphs were exported from is refused)."""
    if family_of(model["name"]) != model["family"]:
        raise EngineMismatchError(f"expected model {model['name']!r} to be of family {model['family']!r}, "
                                  f"got family {family_of(model['name'])!r}; rebuild")
    loaded = _load_recorded(model)
    got = json.loads(json.dumps(loaded.model_config, default=str))
    want = model.get("config")
    if got != want:
        keys = sorted(set(got) | set(want if isinstance(want, dict) else {}))
        key = next((k for k in keys if not isinstance(want, dict) or got.get(k) != want.get(k)), "?")
        raise EngineMismatchError(
            f"expected model {model['name']} with the architecture the engines were built from ({key} "
            f"{(want or {}).get(key) if isinstance(want, dict) else want!r}), got {key} {got.get(key)!r} where it "
            f"loads now; rebuild with clusca-trt build")
    return loaded


def _load_recorded(model: dict) -> LoadedModel:
    src = model["source"]
    options = model.get("options", {})
    if src["kind"] == "random-init":
        return load_model(model["name"], random_init=True, seed=src["seed"], **options)
    if src["kind"] == "builtin":
        loaded = load_model(model["name"], **options)
        if "sha256" in src and loaded.source.get("sha256") != src["sha256"]:
            raise EngineMismatchError(
                f"the built-in weights of {model['name']} changed since the engines were built (sha256 differs); rebuild"
            )
        return loaded
    loaded = load_model(model["name"], checkpoint=src["path"], **options)
    if loaded.source["sha256"] != src["sha256"]:
        raise EngineMismatchError(f"checkpoint {src['path']} changed since the engines were built (sha256 differs); rebuild")
    return loaded
