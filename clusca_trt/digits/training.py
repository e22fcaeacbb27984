"""Training of the built-in digits models (used by ``benchmarks/train_digits.py``):

    train_dit(cfg, images, labels, DiTTrainOptions)       -> DiT (EMA weights), eps-prediction
    train_classifier(images, labels, ClassifierOptions)    -> DigitsClassifier

The DiT learns eps under the forward process of the samplers it will be used with:
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``abar = cumprod(1 - linear_betas())``
over ``TRAIN_STEPS`` (``runtime/samplers.py``), so DDIM/DDPM sampling is exact for it.
The loss is the eps-MSE with capped truncated-SNR weights (see ``DiTTrainOptions``).
Classifier-free guidance: the label is replaced by the null class with ``label_dropout``.

Everything is seeded (one ``torch.Generator`` for data order, timesteps, noise and dropout);
the same seed, thread count and torch build give the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, one_line
from ..models.dit import DiT, DiTConfig
from ..runtime.samplers import TRAIN_STEPS, linear_betas

log = logging.getLogger(__name__)


def alphas_cumprod() -> torch.Tensor:
    """``abar_t`` for t = 0..TRAIN_STEPS-1, float64: the samplers' schedule."""
    return torch.from_numpy(np.cumprod(1.0 - linear_betas(TRAIN_STEPS)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The forward process at integer timesteps ``t`` [B]."""
    a = abar[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def loss_weights(abar: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-timestep eps-MSE weights ``clip((1 - abar) / abar, 1, cap)`` (= clip(1 / SNR)), float32."""
    return ((1.0 - abar) / abar).clamp(1.0, cap).float()


def init_dit(model: DiT, seed: int) -> DiT:
    """DiT's own initialisation: xavier-uniform linears, normal(0.02) label and timestep
    embeddings, zero adaLN modulation and zero output layer (adaLN-Zero)."""
    gen = torch.Generator().manual_seed(seed)

    def xavier(w: torch.Tensor) -> None:
        fan_out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w.copy_(torch.rand(w.shape, generator=gen) * 2 * bound - bound)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                xavier(mod.weight)
                mod.bias.zero_()
        xavier(model.x_embedder.proj.weight)
        model.x_embedder.proj.bias.zero_()
        model.y_embedder.embedding_table.weight.copy_(
            torch.randn(model.y_embedder.embedding_table.weight.shape, generator=gen) * 0.02
        )
        for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.zero_()
            blk.adaLN_modulation[-1].bias.zero_()
        fl = model.final_layer
        for lin in (fl.adaLN_modulation[-1], fl.linear):
            lin.weight.zero_()
            lin.bias.zero_()
    return model


def _check_counts(opt) -> None:
    """``steps``, ``batch`` and ``threads`` of a training options dataclass are >= 1."""
    for f in ("steps", "batch", "threads"):
        if getattr(opt, f) < 1:
            raise ConfigError(f"{f} must be >= 1, got {getattr(opt, f)}")


@dataclass(frozen=True)
class DiTTrainOptions:
    """steps x batch samples; AdamW at ``lr`` after ``warmup`` linear steps, cosine to ``lr * final_lr``.

    ``snr_cap``: per-sample weight ``clip(1 / SNR(t), 1, snr_cap)`` on the eps-MSE (1: plain
    eps-MSE). This is the truncated-SNR weighting (Salimans & Ho 2022: ``max(SNR, 1)`` on the
    x0 error), capped: high-noise steps, where the class decides the image but the plain eps
    loss hardly sees it, count up to ``snr_cap`` times more. The model still predicts eps."""

    steps: int = 4000
    batch: int = 32
    lr: float = 2e-3
    final_lr: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.998
    label_dropout: float = 0.1
    snr_cap: float = 20.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # intra-op threads; on a busy 2-core machine 1 is several times faster than 2

    def __post_init__(self) -> None:
        _check_counts(self)
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.snr_cap < 1.0:
            raise ConfigError(f"snr_cap must be >= 1, got {self.snr_cap}")


def _lr_at(step: int, opt: DiTTrainOptions | "ClassifierOptions") -> float:
    if step < opt.warmup:
        return opt.lr * (step + 1) / opt.warmup
    frac = (step - opt.warmup) / max(1, opt.steps - opt.warmup)
    return opt.lr * (opt.final_lr + (1 - opt.final_lr) * 0.5 * (1 + math.cos(math.pi * frac)))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=2.0)


def train_dit(
    cfg: DiTConfig,
    images: np.ndarray,
    labels: np.ndarray,
    opt: DiTTrainOptions,
    progress: bool = True,
    snapshot: Callable[[int, DiT], None] | None = None,
    snapshot_every: int = 500,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[DiT, list[float]]:
    """Train a DiT on ``images`` [n, C, H, W] in [-1, 1]; returns the EMA model and the loss per step.
    ``snapshot(step, ema_model)`` is called every ``snapshot_every`` steps (to look at it while it trains).
    ``init``: a state dict to start from (a second stage of training) instead of DiT's initialisation;
    the EMA starts there too."""
    if cfg.learn_sigma:
        raise ConfigError("train_dit trains eps only, so the config needs learn_sigma=False, got True")
    if images.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise ConfigError(
            f"expected images of shape [n, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}], "
            f"got {list(images.shape)}"
        )
    torch.set_num_threads(opt.threads)
    gen = torch.Generator().manual_seed(opt.seed)
    model = init_dit(DiT(cfg), opt.seed).train()
    if init is not None:
        try:
            model.load_state_dict(init)
        except RuntimeError as e:
            raise ConfigError(f"init weights do not match the config: {one_line(e)}") from e
    ema = init_dit(DiT(cfg), opt.seed).eval()
    ema.load_state_dict(model.state_dict())
    for p in ema.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    abar = alphas_cumprod()
    weight = loss_weights(abar, opt.snr_cap)
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    y_all = torch.from_numpy(np.asarray(labels, np.int64))
    n = len(x_all)
    order, pos = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = _progress(opt.steps, "train dit", progress)
    for step in range(opt.steps):
        if pos + opt.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + opt.batch]
        pos += opt.batch
        x0, y = x_all[idx], y_all[idx].clone()
        drop = torch.rand(len(y), generator=gen) < opt.label_dropout
        y[drop] = cfg.num_classes
        t = torch.randint(0, TRAIN_STEPS, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = q_sample(x0, t, noise, abar)
        loss = torch.mean(weight[t] * torch.mean((model(xt, t.float(), y) - noise) ** 2, dim=(1, 2, 3)))
        for g in optim.param_groups:
            g["lr"] = _lr_at(step, opt)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip:
            nn.utils.clip_grad_norm_(params, opt.grad_clip)
        optim.step()
        decay = opt.ema if init is not None else min(opt.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - decay)
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        if step % 250 == 0 or step == opt.steps - 1:
            log.info(
                "step %d/%d: loss %.4f (mean of last 200), %.0f s",
                step + 1, opt.steps, np.mean(losses[-200:]), time.perf_counter() - t0,
            )
        if snapshot is not None and (step + 1) % snapshot_every == 0:
            snapshot(step + 1, ema)
    bar.close()
    return ema, losses


@dataclass(frozen=True)
class ClassifierOptions:
    """AdamW for ``steps`` batches; random shifts of up to ``shift`` pixels (padded with -1, the background)."""

    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    final_lr: float = 0.02
    warmup: int = 100
    weight_decay: float = 1e-4
    shift: int = 3
    seed: int = 0
    threads: int = 1  # intra-op threads; on a busy 2-core machine 1 is several times faster than 2

    def __post_init__(self) -> None:
        _check_counts(self)
        if self.shift < 0:
            raise ConfigError(f"shift must be >= 0, got {self.shift}")


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate every image [B, C, H, W] by its own (dy, dx) in [-shift, shift], padding with -1."""
    if shift == 0:
        return x
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), value=-1.0)
    d = torch.randint(0, 2 * shift + 1, (B, 2), generator=gen)
    return torch.stack([padded[i, :, d[i, 0] : d[i, 0] + H, d[i, 1] : d[i, 1] + W] for i in range(B)])


def train_classifier(images: np.ndarray, labels: np.ndarray, opt: ClassifierOptions, progress: bool = True):
    """Train the quality classifier on ``images`` [n, 1, 32, 32] in [-1, 1]."""
    from .quality import DigitsClassifier

    torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)  # dropout inside the model
    gen = torch.Generator().manual_seed(opt.seed)
    model = DigitsClassifier()
    with torch.no_grad():  # seeded init independent of the global RNG state
        for p in model.parameters():
            if p.ndim > 1:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            else:
                p.zero_()
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    y_all = torch.from_numpy(np.asarray(labels, np.int64))
    bar = _progress(opt.steps, "train classifier", progress)
    for step in range(opt.steps):
        idx = torch.randint(0, len(x_all), (opt.batch,), generator=gen)
        x = random_shift(x_all[idx], opt.shift, gen)
        loss = nn.functional.cross_entropy(model(x), y_all[idx])
        for g in optim.param_groups:
            g["lr"] = _lr_at(step, opt)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        bar.update(1)
        if step % 500 == 0 or step == opt.steps - 1:
            log.info("classifier step %d/%d: loss %.4f", step + 1, opt.steps, float(loss))
    bar.close()
    return model.eval()
