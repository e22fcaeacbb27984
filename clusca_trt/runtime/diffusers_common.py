"""What the diffusers text-to-image/video runtimes (FLUX, HunyuanVideo) share: ``FlowMatchingRuntime``,
the base of both (the step loop over a flow-matching scheduler, chunks of the engine batch padded
with zeros, the text-encoder pipeline and its folder, ``generate``), quiet loading of
diffusers/transformers, and checks of prompts and precomputed embeddings. A family subclass says
how its latents are drawn, which sigmas it samples, what the graphs are fed and how prompts are
encoded. Every message names the family or the inputs it is about.

The family's sampling facts (latent shape, text length, scheduler config, ...) come from the
manifest's ``model.sampling`` (written at build time by the model adapter), never from model code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import ClusCaConfig
from ..errors import CheckpointError, InputError, one_line
from ..families import Family
from ..fields import row_shape
from . import device_loop
from .denoiser import PAD_KEY, Denoiser, SampleKey, as_denoiser, check_noise_cost, sample_keys

log = logging.getLogger(__name__)

Denoise = Callable[[int, dict], np.ndarray]  # a Denoiser, or a plain model call (the test oracle)


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


@functools.lru_cache(maxsize=1)
def _text_pipeline(module: str, cls: str, root: str, label: str):
    """diffusers' pipeline ``module.cls`` with the text encoders and tokenizers only (no transformer, no VAE)."""
    try:
        with quiet_loading():
            pipe = getattr(importlib.import_module(module), cls).from_pretrained(  # local only: never the network
                root, transformer=None, vae=None, local_files_only=True)
    except Exception as e:  # diffusers/transformers raise many types for a bad folder
        message = f"cannot load the {label} text encoders from {root}: {type(e).__name__}: {e}"
        raise CheckpointError(one_line(message)) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FlowMatchingRuntime:
    """A text-to-image/video family sampled with diffusers' ``FlowMatchEulerDiscreteScheduler``.

    The subclass names its registry entry (``family``: its label, its prompt embeddings, i.e. the
    array inputs a run takes besides the latents, in the order ``feeds`` receives them, their shapes
    and the default guidance) and the diffusers pipeline module and class whose text encoders, sigmas
    and latent layout it follows; and it implements ``noise_shape``, ``sigmas``, ``feeds`` and
    ``encode_prompts``. ``cfg`` below is the manifest's ``model.sampling`` as attributes.
    """

    family: Family
    pipeline_module: str
    pipeline_class: str

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def embeds(self) -> tuple[str, ...]:
        """The family's embedding inputs (``prompt_embeds`` first)."""
        return tuple(f.name for f in self.family.inputs if f.kind == "array")

    @property
    def default_guidance(self) -> float:
        return self.family.field("guidance_scale").default

    # -- what a family says ------------------------------------------------------------------
    def noise_shape(self, cfg) -> tuple[int, ...]:
        """The shape of one sample's initial noise, as the diffusers pipeline draws it."""
        raise NotImplementedError

    def pack(self, noise: torch.Tensor, cfg) -> np.ndarray:
        """Initial noise [n, *noise_shape] as the graphs take the latents."""
        return noise.numpy()

    def sigmas(self, cfg, steps: int) -> tuple[np.ndarray | None, dict]:
        """(sigmas, extra keyword arguments of ``retrieve_timesteps``)."""
        raise NotImplementedError

    def feeds(self, cfg, x: torch.Tensor, t: torch.Tensor, embeds: list[np.ndarray], guidance: float) -> dict:
        raise NotImplementedError

    def encode_prompts(self, root: Path, prompts: list[str], cfg) -> list[np.ndarray]:
        raise NotImplementedError

    def check_embeds(self, cfg, given: dict) -> list[np.ndarray]:
        """The embedding inputs as float32 arrays [n, *their shape by the sampling facts], in ``embeds`` order."""
        facts = vars(cfg)
        return [check_embeds(n, given[n], row_shape(self.family.field(n), facts)) for n in self.embeds]

    def pad_chunk(self, arrays: list[np.ndarray], real: int) -> None:
        """Fix up the zero rows that pad a chunk (in place), where zeros are not valid inputs."""

    def finish(self, latents: np.ndarray, cfg) -> np.ndarray:
        """The sampled latents as the decoder takes them."""
        return latents

    # -- shared ------------------------------------------------------------------------------
    def module(self):
        return quiet_import(self.pipeline_module)

    def initial_latents(self, keys: list[SampleKey], cfg) -> np.ndarray:
        """One sample of initial noise per key, as the diffusers pipeline draws it: sample ``(seed, j)``
        is row ``j`` of ``torch.randn((m, *noise_shape), generator=manual_seed(seed))`` for the
        largest ``m`` among the keys of that seed, so ``n`` samples of one seed are the pipeline's
        ``n`` samples (and row ``j`` does not depend on ``m`` where a sample's size is a multiple
        of 16, as every real latent's is: torch fills normal noise 16 values at a time)."""
        shape = self.noise_shape(cfg)
        check_noise_cost(keys, shape)  # the rows below a key's index are drawn too: bounded
        out = torch.empty((len(keys), *shape))
        for seed in {k[0] for k in keys}:
            rows = [i for i, k in enumerate(keys) if k[0] == seed]
            m = max(keys[i][1] for i in rows) + 1
            drawn = torch.randn((m, *shape), generator=torch.Generator().manual_seed(seed))
            for i in rows:
                out[i] = drawn[keys[i][1]]
        return self.pack(out, cfg)

    def make_scheduler(self, cfg, steps: int):
        """A fresh scheduler with the family pipeline's sigmas (and shift) for ``steps``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg.scheduler)
        sigmas, extra = self.sigmas(cfg, steps)
        self.module().retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, **extra)
        scheduler.set_begin_index(0)
        return scheduler

    def text_pipeline(self, root: Path):
        return _text_pipeline(self.pipeline_module, self.pipeline_class, str(root), self.label)

    def encoder_folder(self, pipe, encoders: str | Path | None) -> Path:
        """Where the text encoders are: ``encoders`` (a pipeline folder, or its ``transformer/``), or
        the pipeline folder of the checkpoint the engines were built from."""
        if encoders is not None:
            root = Path(encoders)
            if not (root / "model_index.json").is_file() and (root.parent / "model_index.json").is_file():
                root = root.parent
        else:
            recorded = pipe.model.get("source", {}).get("pipeline")
            root = Path(recorded) if recorded else None
        if root is None or not (root / "model_index.json").is_file():
            where = encoders or pipe.model.get("source", {}).get("path") or "the engines' source (random weights)"
            raise InputError(
                f"expected a {self.label} pipeline folder (model_index.json, text encoders) for prompts at {where}, "
                f"got none; pass encoders=FOLDER, or {', '.join(self.embeds)}"
            )
        return root

    def prompt_inputs(self, pipe, cfg, prompt, given: dict, encoders) -> tuple[list[str] | None, list[np.ndarray]]:
        """(prompts or None, the embedding arrays in ``embeds`` order) for a run, validated."""
        prompts = prompt_list(prompt, given.get(self.embeds[0]), " and ".join(self.embeds[1:]))
        if prompts is not None:
            return prompts, self.encode_prompts(self.encoder_folder(pipe, encoders), prompts, cfg)
        missing = [n for n in self.embeds[1:] if given.get(n) is None]
        if missing:
            raise InputError(f"expected {missing[0]} with prompt_embeds, got none")
        arrays = self.check_embeds(cfg, given)
        check_rows(arrays[0], **dict(zip(self.embeds[1:], arrays[1:])))
        return None, arrays

    def sample_chunk(self, denoise: Denoiser, cfg, steps: int, latents: np.ndarray, embeds: list[np.ndarray],
                     guidance: float, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Denoise one chunk of ``latents`` (B = the engine batch) through all steps (on the engine's
        device where it can run the whole loop: ``runtime.device_loop``)."""
        scheduler = self.make_scheduler(cfg, steps)
        feeds = lambda x, t: self.feeds(cfg, x, t, embeds, guidance)  # noqa: E731
        x0 = torch.from_numpy(latents)
        denoise.condition([feeds(x0, t) for t in scheduler.timesteps])  # the engines take it ahead
        if denoise.loop_engine is not None:
            out = device_loop.flow_chunk(denoise, scheduler, latents, feeds, progress)
            if out is not None:
                return out
        return denoise_steps(denoise, scheduler, latents, feeds, progress)

    def sample(self, make_denoiser: Callable[[list[SampleKey]], Denoise], batch: int, cfg,
               embeds: list[np.ndarray], keys: list[SampleKey], steps: int, guidance: float,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """All samples in chunks of the engine batch (the last one padded). Sample ``j``'s initial
        noise and ClusCa draws come from its key ``keys[j]`` alone, whatever shares its chunk."""
        x_all = self.initial_latents(keys, cfg)
        out = []
        for j, real, (x, *chunk) in padded_chunks(batch, x_all, *embeds):
            self.pad_chunk(chunk, real)
            chunk_keys = keys[j * batch : j * batch + real] + [PAD_KEY] * (batch - real)
            out.append(self.sample_chunk(as_denoiser(make_denoiser(chunk_keys)), cfg, steps, x, chunk, guidance, progress)[:real])
        return np.concatenate(out, axis=0)

    def generate(self, pipe, config: ClusCaConfig, prompt: str | list[str] | None = None, *, seed: int = 0,
                 steps: int | None = None, guidance_scale: float | None = None, text_propagation: float = 0.0,
                 encoders: str | Path | None = None, progress: Callable[[int], None] | None = None,
                 keys: list[SampleKey] | None = None, **embeds):
        """``Pipeline.generate`` for the family: from prompts or precomputed embeddings (``embeds``).
        ``keys``: one ``(seed, index)`` per sample instead of ``(seed, 0), (seed, 1), ...``."""
        unknown = sorted(set(embeds) - set(self.embeds))
        if unknown:
            raise InputError(f"{self.label} takes prompt or {', '.join(self.embeds)}, got {', '.join(unknown)}")
        cfg = sampling(pipe)
        steps = self.family.steps(vars(cfg)) if steps is None else steps
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        planned = pipe.plan(steps, config)
        prompts, arrays = self.prompt_inputs(pipe, cfg, prompt, embeds, encoders)
        n = arrays[0].shape[0]
        keys = sample_keys(seed, n) if keys is None else list(keys)
        if len(keys) != n:
            raise InputError(f"expected one sample key per prompt ({n}), got {len(keys)}")
        factory = pipe.denoisers(planned, config, propagation={"txt": text_propagation})
        t0 = time.perf_counter()
        latents = self.sample(factory, pipe.spec.options.batch, cfg, arrays, keys, steps, guidance, progress)
        seconds = time.perf_counter() - t0
        return pipe.result(factory, self.finish(latents, cfg), None, seconds, prompts=prompts, steps=steps)


def sampling(pipe) -> SimpleNamespace:
    """The manifest's ``model.sampling`` (what the adapter recorded at build time) as attributes."""
    info = pipe.model.get("sampling")
    if not info:
        raise CheckpointError("expected the model's sampling facts in the engines' manifest, got none; rebuild")
    return SimpleNamespace(**info)


# --------------------------------------------------------------------------------------------
# prompts


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
