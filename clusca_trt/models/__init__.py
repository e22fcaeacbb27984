"""Model families and their named configs: ``load_model`` turns a name plus a checkpoint
(or ``random_init``) into an adapter the exporter and the torch backend use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..hashing import tree_sha256
from . import dit

log = logging.getLogger(__name__)

DEFAULT_MODEL = "dit-tiny"


@dataclass(frozen=True)
class LoadedModel:
    name: str
    family: str
    adapter: object
    model_config: dict
    source: dict = field(default_factory=dict)  # kind, path, sha256 or seed: what the engines are built from


def model_names() -> list[str]:
    return ["dit", *dit.NAMED_CONFIGS]


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Load ``name`` from ``checkpoint`` (a file or a diffusers folder), or with random weights."""
    if name != "dit" and name not in dit.NAMED_CONFIGS:
        raise ConfigError(f"model must be one of {', '.join(model_names())}, got {name!r}")
    if checkpoint is not None and random_init:
        raise ConfigError("give either a checkpoint or random_init, got both")
    if checkpoint is None and not random_init:
        raise ConfigError(f"model {name} needs a checkpoint (or random_init for tests), got neither")
    if random_init:
        if name == "dit":
            raise ConfigError("random_init needs a named config (dit-xl-2, dit-b-2, ...), got 'dit'")
        cfg = dit.NAMED_CONFIGS[name]
        log.warning("model %s has RANDOM weights (random_init, seed %d): not for real use", name, seed)
        model = dit.init_random(dit.DiT(cfg), seed)
        source = {"kind": "random-init", "seed": seed}
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: expected a file or folder at {path}")
        expect = dit.NAMED_CONFIGS.get(name)
        if path.is_dir():
            model = dit.load_diffusers(path, expect)
            kind = "diffusers"
        else:
            if expect is None:
                raise ConfigError(
                    "an original DiT checkpoint file needs a named config (--model dit-xl-2, ...), got 'dit'"
                )
            model = dit.load_original(path, expect)
            kind = "original"
        log.info("hashing checkpoint %s", path)
        source = {"kind": kind, "path": str(path.resolve()), "sha256": tree_sha256(path)}
        cfg = model.cfg
    return LoadedModel(name, dit.FAMILY, dit.DiTAdapter(model), cfg.to_dict(), source)


def adapter_from_config(family: str, model_config: dict, state_dict=None):
    """Rebuild an adapter from a manifest's model config (weights from ``state_dict`` if given)."""
    if family != dit.FAMILY:
        raise ConfigError(f"model family must be {dit.FAMILY!r}, got {family!r}")
    model = dit.DiT(dit.DiTConfig(**model_config))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return dit.DiTAdapter(model)
