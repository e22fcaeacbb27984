"""What the diffusers text-to-image/video runtimes (FLUX, HunyuanVideo) share: quiet loading of
diffusers/transformers, the step loop over a flow-matching scheduler, chunks of the engine batch
padded with zeros, the text-encoder pipeline and its folder, and checks of prompts and
precomputed embeddings. Every message names the family or the inputs it is about.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..models.diffusers_folder import pipeline_dir

log = logging.getLogger(__name__)

Denoise = Callable[[int, dict], np.ndarray]


@contextlib.contextmanager
def quiet_loading():
    """diffusers/transformers show progress bars and import-time notices while loading; keep them off."""
    import diffusers.utils.logging as dlog

    try:  # imported first: its first import resets the "transformers" logger's level
        import transformers.utils.logging as tlog
    except ImportError:  # transformers is only needed for prompts
        tlog = None
    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    bars = [dlog.is_progress_bar_enabled(), tlog is not None and tlog.is_progress_bar_enabled()]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        dlog.disable_progress_bar()
        if tlog is not None:
            tlog.disable_progress_bar()
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def quiet_import(module: str):
    """``module`` (a diffusers pipeline module), imported under ``quiet_loading``."""
    with quiet_loading():
        return importlib.import_module(module)


# --------------------------------------------------------------------------------------------
# sampling


def denoise_steps(
    denoise: Denoise,
    scheduler,
    latents: np.ndarray,
    feeds: Callable[[torch.Tensor, torch.Tensor], dict],
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``latents`` through every step of ``scheduler``: the denoiser gets ``feeds(x, t)`` at step
    ``s``, the scheduler makes the next ``x`` from its output."""
    x = torch.from_numpy(latents)
    for s, t in enumerate(scheduler.timesteps):
        out = denoise(s, feeds(x, t))
        x = scheduler.step(torch.from_numpy(out), t, x, return_dict=False)[0]
        if progress:
            progress(s)
    return x.numpy()


def padded_chunks(batch: int, *arrays: np.ndarray) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(chunk index, its real rows, each array's rows of the chunk padded with zeros to ``batch``)
    for the rows of ``arrays`` (all with the same row count) in chunks of ``batch``."""
    n = arrays[0].shape[0]
    for j, start in enumerate(range(0, n, batch)):
        rows = slice(start, start + batch)
        yield j, min(batch, n - start), [pad(a[rows], batch) for a in arrays]


def pad(a: np.ndarray, rows: int) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), np.float32)])


# --------------------------------------------------------------------------------------------
# prompts


def text_pipeline(pipeline_cls, root: str, label: str):
    """diffusers' ``pipeline_cls`` with the text encoders and tokenizers only (no transformer, no VAE)."""
    try:
        with quiet_loading():
            pipe = pipeline_cls.from_pretrained(root, transformer=None, vae=None)
    except Exception as e:  # diffusers/transformers raise many types for a bad folder
        message = f"cannot load the {label} text encoders from {root}: {type(e).__name__}: {e}"
        raise CheckpointError(message.splitlines()[0]) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoder_folder(pipe, encoders: str | Path | None, label: str, embeds: str) -> Path:
    """Where the text encoders are: ``encoders``, or the checkpoint folder the engines came from.
    ``label``: the family in the message; ``embeds``: the inputs that skip the encoders."""
    if encoders is not None:
        root = pipeline_dir(Path(encoders)) or Path(encoders)
    else:
        path = pipe.model.get("source", {}).get("path")
        root = pipeline_dir(Path(path)) if path else None
    if root is None or not (root / "model_index.json").is_file():
        where = encoders or pipe.model.get("source", {}).get("path") or "the engines' source (random weights)"
        raise InputError(
            f"expected a {label} pipeline folder (model_index.json, text_encoder/, text_encoder_2/) for "
            f"prompts at {where}, got none; pass encoders=FOLDER, or {embeds}"
        )
    return root


def prompt_list(prompt, prompt_embeds, companions: str) -> list[str] | None:
    """The prompts of a run as a list, or None where it has ``prompt_embeds`` (exactly one of them
    is given; ``companions``: the other embeddings that come with ``prompt_embeds``)."""
    if (prompt is None) == (prompt_embeds is None):
        raise InputError(f"expected either prompt or prompt_embeds (with {companions}), got "
                         + ("both" if prompt is not None else "neither"))
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"expected a prompt string or a non-empty list of them, got {prompt!r}")
    return prompts


def check_embeds(name: str, a, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` as float32 [n, *shape] (n >= 1), or an input error naming ``name``."""
    a = a.detach().cpu().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float32)
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != shape or a.shape[0] < 1:
        want = "[n, " + ", ".join(str(d) for d in shape) + "]"
        raise InputError(f"{name}: expected float32{want}, got {list(a.shape)}")
    return a


def check_rows(embeds: np.ndarray, **others: np.ndarray) -> None:
    """Every one of ``others`` has as many rows as ``prompt_embeds``."""
    for name, a in others.items():
        if a.shape[0] != embeds.shape[0]:
            raise InputError(f"{name}: expected {embeds.shape[0]} rows like prompt_embeds, got {a.shape[0]}")
