"""Checks of what a checkpoint holds, so that a bad one is a one-line ``CheckpointError`` at build
time (never a traceback, never all-NaN engines):

    read_config(path, what)             a config.json that is a JSON object
    config_value(raw, name, kind, ...)  one field of it, of the expected type
    check_state_dict(sd, what)          every value a floating-point tensor (float16 / bfloat16 /
                                        float64 are cast to float32, with a log line; int, bool and
                                        other values are refused)
    check_safetensors_dtypes(folder)    the same rule for a diffusers folder's weight files, read
                                        from their headers before diffusers loads them
    check_weights(module, what)         every floating tensor of a loaded model finite (and float32)
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError, one_line
from ..files import loads_json, read_json

log = logging.getLogger(__name__)

_CAST = (torch.float16, torch.bfloat16, torch.float64)
# safetensors dtype names: floating ones are weights; the rest is not what a transformer's weights are
_ST_FLOAT = {"F32"}
_ST_CAST = {"F16", "BF16", "F64"}


def read_config(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (a diffusers ``config.json`` and the like)."""
    try:
        raw = read_json(path)  # bounded: size and nesting
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is not readable JSON: {one_line(e)}") from e
    if not isinstance(raw, dict):
        got = "null" if raw is None else f"a JSON {type(raw).__name__}"
        raise CheckpointError(f"{what} {path}: expected a JSON object, got {got}")
    return raw


def config_value(raw: dict, name: str, kind, default, where: str, low: float | None = None):
    """``raw[name]`` (``default`` where absent) of type ``kind``: int (not bool), float (any real),
    bool, str, dict or "ints" (a list of integers), and ``>= low`` where given; an error naming
    ``where`` otherwise."""
    value = raw.get(name, default)
    if value is None and default is None:
        return None
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        "ints": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    }[kind](value)
    if not ok:
        want = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
                "ints": "a list of integers"}[kind]
        raise CheckpointError(f"{where}: expected {name} to be {want}, got {json.dumps(value, default=str)[:40]}")
    if low is not None and kind in (int, float) and not value >= low:
        raise CheckpointError(f"{where}: expected {name} >= {low}, got {value}")
    return value


def check_state_dict(sd: dict, what: str) -> dict:
    """A state dict whose every value is a floating-point tensor, as float32 (a copy where cast)."""
    out, cast = {}, set()
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{what}: expected tensor names (strings) as keys, got {type(k).__name__} {k!r}")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{what}: expected a tensor for {k}, got {type(v).__name__}")
        if not v.is_floating_point():
            raise CheckpointError(f"{what}: expected floating-point weights, got {k} of dtype {str(v.dtype).replace('torch.', '')}")
        if v.dtype in _CAST:
            cast.add(str(v.dtype).replace("torch.", ""))
            v = v.float()
        out[k] = v
    if cast:
        log.info("%s holds %s weights: cast to float32 (the engines are float32)", what, "/".join(sorted(cast)))
    return out


def check_safetensors_dtypes(folder: Path, what: str) -> None:
    """Every tensor in the ``*.safetensors`` files of ``folder`` is floating point (from the headers)."""
    cast = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 2**20:
                    raise ValueError(f"header of {n} bytes")
                header = loads_json(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{what}: {f.name} is not a readable safetensors file: {one_line(e)}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{what}: {f.name} is not a readable safetensors file: header is not an object")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            if dtype in _ST_CAST:
                cast.add(dtype)
            elif dtype not in _ST_FLOAT:
                raise CheckpointError(f"{what}: expected floating-point weights, got {name} of dtype {dtype} in {f.name}")
    if cast:
        log.info("%s holds %s weights: loaded as float32 (the engines are float32)", what, "/".join(sorted(cast)))


def check_weights(module: torch.nn.Module, what: str) -> None:
    """Every floating parameter and buffer of ``module`` is finite (checked once, at load), and
    float32 (a half-precision module is cast, with a log line)."""
    dtypes = {t.dtype for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:
        log.info("%s has %s weights: cast to float32 (the engines are float32)", what,
                 "/".join(sorted(str(d).replace("torch.", "") for d in dtypes - {torch.float32})))
        module.float()
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CheckpointError(f"{what}: expected finite weights, got {bad} NaN/inf value(s) in {name}")
