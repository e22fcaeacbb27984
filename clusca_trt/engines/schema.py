"""The manifest's schema: what ``manifest.json`` must hold for the runtime to use it, checked once
when it is read, so that a malformed or hand-edited manifest is one ``EngineError`` line (never a
``KeyError`` part-way through ``generate``, ``inspect`` or ``build``).

Checked: a JSON object of this format; the required keys and their types; the model (name,
family, config, source, sampling facts); the decoder; the build options (``BuildOptions`` fields,
equal to the spec's); the spec (every field present and well-typed, and equal to the spec its
options make again); one graph entry per graph of the spec; the run defaults (``ClusCaConfig``
fields with valid values) and where they came from (``defaults_source``: an object naming the
tool); and every path (the build folder, graph files, TensorRT plans) a plain
name inside the engine directory: no absolute paths, no ``..``.

And what the manifest says of the model against the spec its graphs are held to (``claims``): the
latent shape is the model input's, FLUX's image tokens, latent size and channels are its packed
input's, the text length and widths are the conditioning inputs', guidance is an input where the
model embeds it, the class count is the model config's, and the decoder is one the family has and
fits the latent channels (pixels: 1 or 3). What needs the graph files themselves (the label
embedding's rows, external data) is ``Manifest.check``'s.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import PurePosixPath

from ..config import ClusCaConfig
from ..errors import ClusCaError, EngineError
from ..families import FAMILIES
from ..fields import MAX_STEPS
from ..spec import BuildOptions, ExportSpec

BUILDS = "builds"  # the folder of immutable build folders inside an engine directory
LEGACY_BUILDS = ".builds"  # where format 3 kept them (hidden); only ever a ``previous`` build now
_JSON_TYPES = {"int": int, "bool": bool, "list": list, "object": dict, "str": str}
DECODERS = ("pixels", "vae", "video-vae")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """One schema violation: where (a dotted path into the manifest) and what."""


def _type_name(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                         int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _get(d: dict, key: str, kind, where: str, required: bool = True):
    if key not in d:
        if required:
            raise _Bad(f"expected {where}.{key}, got none")
        return None
    value = d[key]
    if not _is(value, kind):
        raise _Bad(f"expected {where}.{key} to be {_kind_text(kind)}, got {_type_name(value)} {_short(value)}")
    return value


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return any(_is(value, k) for k in kind)
    if kind is None:
        return value is None
    return isinstance(value, kind)


def _kind_text(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_kind_text(k) for k in kind)
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", None: "null"}[kind]


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return f"({text})" if len(text) <= 40 else f"({text[:37]}...)"


def _ints(value, where: str, positive: bool = True) -> list[int]:
    if not isinstance(value, list) or not all(_is(v, int) and (v > 0 or not positive) for v in value):
        raise _Bad(f"expected {where} to be a list of {'positive ' if positive else ''}integers, got {_short(value)}")
    return value


def plain_name(name, where: str) -> str:
    """A file name inside its folder: not empty, no separators, not ``.`` or ``..``, not absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise _Bad(f"expected {where} to be a file name inside the engine directory, got {_short(name)}")
    return name


def build_dir_name(value, where: str = "build_dir", folders: tuple[str, ...] = (BUILDS,)) -> str:
    """``builds/<name>``: a build folder inside the engine directory (``folders``: the parents allowed)."""
    parts = PurePosixPath(value).parts if isinstance(value, str) else ()
    if len(parts) != 2 or parts[0] not in folders or value != f"{parts[0]}/{parts[1]}":
        raise _Bad(f"expected {where} to be {BUILDS}/<name> inside the engine directory, got {_short(value)}")
    plain_name(parts[1], where)
    return value


def is_build_dir(value, legacy: bool = False) -> bool:
    """Whether ``value`` is a valid ``build_dir``: ``builds/<name>`` (``legacy``: or format 3's
    ``.builds/<name>``), nothing outside."""
    try:
        build_dir_name(value, folders=(BUILDS, LEGACY_BUILDS) if legacy else (BUILDS,))
    except _Bad:
        return False
    return True


def _file_entries(entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise _Bad(f"expected {where} to be an object, got {_type_name(entry)}")
    plain_name(_get(entry, "file", str, where), f"{where}.file")
    files = _get(entry, "files", list, where)
    if not files:
        raise _Bad(f"expected {where}.files to list at least one file, got none")
    for i, f in enumerate(files):
        w = f"{where}.files[{i}]"
        if not isinstance(f, dict):
            raise _Bad(f"expected {w} to be an object, got {_type_name(f)}")
        plain_name(_get(f, "file", str, w), f"{w}.file")
        if _get(f, "bytes", int, w) < 0:
            raise _Bad(f"expected {w}.bytes >= 0, got {f['bytes']}")
        if not _SHA256.fullmatch(_get(f, "sha256", str, w)):
            raise _Bad(f"expected {w}.sha256 to be 64 hex digits, got {_short(f['sha256'])}")
    if files[0]["file"] != entry["file"]:
        raise _Bad(f"expected {where}.files[0] to be {entry['file']}, got {files[0]['file']}")


def _spec(d) -> ExportSpec:
    if not isinstance(d, dict):
        raise _Bad(f"expected spec to be an object, got {_type_name(d)}")
    _get(d, "family", str, "spec")
    _get(d, "options", dict, "spec")
    if _get(d, "graph_batch", int, "spec") < 1:
        raise _Bad(f"expected spec.graph_batch >= 1, got {d['graph_batch']}")
    _ints(_get(d, "output_shape", list, "spec"), "spec.output_shape")
    for i, t in enumerate(_get(d, "model_inputs", list, "spec")):
        w = f"spec.model_inputs[{i}]"
        if not isinstance(t, dict):
            raise _Bad(f"expected {w} to be an object, got {_type_name(t)}")
        _get(t, "name", str, w)
        _ints(_get(t, "shape", list, w), f"{w}.shape")
        _get(t, "dtype", str, w)
    for key, fields in (("slots", {"name": str, "layers": int, "tokens": int, "dim": int}),
                        ("groups", {"name": str, "tokens": int, "dim": int, "clusters": int})):
        for i, s in enumerate(_get(d, key, list, "spec")):
            w = f"spec.{key}[{i}]"
            if not isinstance(s, dict):
                raise _Bad(f"expected {w} to be an object, got {_type_name(s)}")
            for name, kind in fields.items():
                if _get(s, name, kind, w) is not None and kind is int and s[name] < 0:
                    raise _Bad(f"expected {w}.{name} >= 0, got {s[name]}")
            extra = set(s) - set(fields) - ({"fresh_group"} if key == "slots" else set())
            if extra:
                raise _Bad(f"expected {w} to have only {', '.join(fields)}, got {', '.join(sorted(extra))}")
            if key == "slots":
                _get(s, "fresh_group", (str, None), w, required=False)
    _options(d["options"], "spec.options")
    try:
        spec = ExportSpec.from_dict(d)
    except ClusCaError as e:
        raise _Bad(f"spec: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise _Bad(f"spec cannot be read: {type(e).__name__}: {e}") from None
    if json.loads(json.dumps(spec.to_dict())) != d:
        raise _Bad("expected spec to be the spec its options and shapes make (graphs, inputs, outputs), "
                   "got one that differs (edited by hand?)")
    return spec


def _fields(cls, d, where: str) -> None:
    """``d`` holds only fields of the frozen config dataclass ``cls``, and makes a valid one."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise _Bad(f"expected {where} keys among {', '.join(names)}, got {', '.join(unknown)}")
    try:
        cls(**d)
    except ClusCaError as e:
        raise _Bad(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise _Bad(f"{where}: {type(e).__name__}: {e}") from None


def _options(d, where: str) -> None:
    _fields(BuildOptions, d, where)


def _model(m) -> None:
    if not isinstance(m, dict):
        raise _Bad(f"expected model to be an object, got {_type_name(m)}")
    _get(m, "name", str, "model")
    family = _get(m, "family", str, "model")
    if family not in FAMILIES:
        raise _Bad(f"expected model.family to be one of {', '.join(FAMILIES)}, got {family!r}")
    _get(m, "config", dict, "model")
    _get(m, "options", dict, "model", required=False)
    src = _get(m, "source", dict, "model")
    kind = _get(src, "kind", str, "model.source")
    if kind == "random-init":
        _get(src, "seed", int, "model.source")
    else:
        _get(src, "path", str, "model.source")
        _get(src, "sha256", str, "model.source")
    _get(src, "pipeline", str, "model.source", required=False)
    info = _get(m, "sampling", dict, "model")
    for key, kind in FAMILIES[family].sampling_facts:  # what the family's runtime reads
        _get(info, key, _JSON_TYPES[kind], "model.sampling")
    if "num_classes" in info and info["num_classes"] < 1:
        raise _Bad(f"expected model.sampling.num_classes >= 1, got {info['num_classes']}")
    if "latent_shape" in info:
        shape = _ints(info["latent_shape"], "model.sampling.latent_shape")
        if family == "dit" and len(shape) != 3:
            raise _Bad(f"expected model.sampling.latent_shape [C, H, W], got {shape}")
    if "latent_size" in info:
        _ints(info["latent_size"], "model.sampling.latent_size")
    if "default_steps" in info and not 1 <= info["default_steps"] <= MAX_STEPS:
        raise _Bad(f"expected model.sampling.default_steps in 1..{MAX_STEPS}, got {info['default_steps']}")
    for key, value in info.items():  # a fact the model config states too must say the same
        if key in m["config"] and m["config"][key] != value:
            raise _Bad(f"expected model.sampling.{key} to equal model.config.{key} {_text(m['config'][key])}, "
                       f"got {_text(value)}")


def _decoder(d, family: str) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise _Bad(f"expected decoder to be an object or null, got {_type_name(d)}")
    kind = _get(d, "kind", str, "decoder")
    if kind not in DECODERS:
        raise _Bad(f"expected decoder.kind to be one of {', '.join(DECODERS)}, got {kind!r}")
    allowed = FAMILIES[family].decoders
    if kind not in allowed:
        raise _Bad(f"expected decoder.kind of a {family} build to be "
                   f"{' or '.join(allowed) if allowed else 'none (latents only)'}, got {kind!r}")
    if kind != "pixels":
        path = _get(d, "path", str, "decoder")
        if not PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise _Bad(f"expected decoder.path to be an absolute folder path without '..', got {_short(path)}")


def _defaults(d) -> None:
    _fields(ClusCaConfig, d, "defaults")


def _tensor(spec: ExportSpec, name: str):
    """The model or conditioning input ``name`` of the spec, or None."""
    for t in (*spec.model_inputs, *spec.cond_inputs):
        if t.name == name:
            return t
    return None


def _text(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _claim(info: dict, key: str, want, what: str) -> None:
    if key in info and info[key] != want:
        raise _Bad(f"expected model.sampling.{key} to be {_text(want)} ({what}), got {_text(info[key])}")


def claims(data: dict, spec: ExportSpec) -> None:
    """What the manifest says of the model (``model.sampling``, ``decoder``) against the spec, whose
    inputs and outputs every graph file is held to: a fact that disagrees with the graphs would
    make the runtime allocate, feed or decode something else than the graphs compute."""
    info = data["model"]["sampling"]
    facts = dict(FAMILIES[data["model"]["family"]].sampling_facts)
    info = {k: v for k, v in info.items() if k in facts}  # only facts the family's runtime reads
    if not spec.model_inputs:
        raise _Bad("expected spec.model_inputs to name the model input, got none")
    x = spec.model_inputs[0]
    if "latent_shape" in info:  # DiT [C, H, W], HunyuanVideo [C, F, H, W]: the model input's per sample
        _claim(info, "latent_shape", list(x.shape[1:]), f"the {x.name} input's shape per sample")
    if "image_tokens" in info:  # FLUX: x is the packed latent [B, tokens, 4 C]
        if len(x.shape) != 3:
            raise _Bad(f"expected the {x.name} input [batch, tokens, channels] of packed latents, got {list(x.shape)}")
        _claim(info, "image_tokens", x.shape[1], f"the {x.name} input's tokens")
        _claim(info, "latent_channels", x.shape[2] // 4, f"a quarter of the {x.name} input's {x.shape[2]} channels")
        lh, lw = (info["latent_size"] + [0, 0])[:2]
        if len(info["latent_size"]) != 2 or lh % 2 or lw % 2 or (lh // 2) * (lw // 2) != x.shape[1]:
            raise _Bad(f"expected model.sampling.latent_size [h, w] (even) with h w / 4 = the {x.shape[1]} image "
                       f"tokens, got {_text(info['latent_size'])}")
        f = info["vae_scale_factor"]
        _claim(info, "height", lh * f, "latent height x vae_scale_factor")
        _claim(info, "width", lw * f, "latent width x vae_scale_factor")
    text = _tensor(spec, "encoder_hidden_states")
    if text is not None:
        _claim(info, "text_length", text.shape[1], "the encoder_hidden_states input's tokens")
        _claim(info, "text_dim", text.shape[2], "the encoder_hidden_states input's width")
    pooled = _tensor(spec, "pooled_projections")
    if pooled is not None:
        _claim(info, "pooled_dim", pooled.shape[1], "the pooled_projections input's width")
    if "guidance_embeds" in info:
        _claim(info, "guidance_embeds", _tensor(spec, "guidance") is not None, "whether the graphs take guidance")
    decoder = data.get("decoder")
    if isinstance(decoder, dict) and decoder.get("kind") == "pixels":
        channels = info.get("latent_shape", [0])[0]
        if channels not in (1, 3):
            raise _Bad(f"expected a pixels decoder on a model of 1 or 3 channels (grey, RGB), got {channels} "
                       f"channels (latents that a VAE decodes)")


def _tensorrt(t) -> None:
    if not isinstance(t, dict):
        raise _Bad(f"expected tensorrt to be an object, got {_type_name(t)}")
    _get(t, "key", str, "tensorrt")
    _get(t, "platform", dict, "tensorrt")
    _get(t, "options", dict, "tensorrt")
    for name, entry in _get(t, "plans", dict, "tensorrt").items():
        _file_entries(entry, f"tensorrt.plans.{name}")


def check_manifest(data, path, fmt: int) -> ExportSpec:
    """The spec of a manifest that passes every check above, else a one-line ``EngineError``."""
    try:
        if not isinstance(data, dict):
            raise _Bad(f"expected a JSON object, got {_type_name(data)}")
        if data.get("format") != fmt:
            raise EngineError(f"expected engine format {fmt} in {path}, got {data.get('format')!r}; "
                              f"rebuild with clusca-trt build")
        _get(data, "key", str, "manifest")
        _get(data, "created", str, "manifest", required=False)
        build_dir_name(_get(data, "build_dir", str, "manifest"))
        if data.get("previous") is not None:  # a format-3 build this one replaced may still be in .builds
            build_dir_name(data["previous"], "previous", folders=(BUILDS, LEGACY_BUILDS))
        digest = _get(data, "digest", str, "manifest", required=False)  # Manifest.read compares it
        if digest is not None and not _SHA256.fullmatch(digest):
            raise _Bad(f"expected manifest.digest to be 64 hex digits, got {_short(digest)}")
        _model(_get(data, "model", dict, "manifest"))
        if "decoder" in data:
            _decoder(data["decoder"], data["model"]["family"])
        build = _get(data, "build", dict, "manifest")
        _options(build, "build")
        spec = _spec(_get(data, "spec", dict, "manifest"))
        if build != data["spec"]["options"]:
            raise _Bad("expected build to equal spec.options, got different options")
        if data["model"]["family"] != spec.family:
            raise _Bad(f"expected model.family to equal spec.family {spec.family!r}, got {data['model']['family']!r}")
        graphs = _get(data, "graphs", dict, "manifest")
        if set(graphs) != set(spec.graphs):
            missing = sorted(set(spec.graphs) - set(graphs))
            extra = sorted(set(graphs) - set(spec.graphs))
            raise _Bad(f"expected graphs {', '.join(spec.graphs)}, got "
                       + (f"none for {', '.join(missing)}" if missing else f"others too: {', '.join(extra)}"))
        for name, entry in graphs.items():
            _file_entries(entry, f"graphs.{name}")
        versions = _get(data, "versions", dict, "manifest")
        if not all(isinstance(v, str) for v in versions.values()):
            raise _Bad("expected versions to map names to version strings, got others")
        _defaults(_get(data, "defaults", dict, "manifest", required=False) or {})
        source = _get(data, "defaults_source", (dict, None), "manifest", required=False)
        if source is not None:
            _get(source, "tool", str, "defaults_source")
        if "tensorrt" in data:
            _tensorrt(data["tensorrt"])
        claims(data, spec)
        return spec
    except _Bad as e:
        raise EngineError(f"{path} is not a valid manifest: {e}; rebuild with clusca-trt build") from None
