"""FLUX.1 (Black Forest Labs) through diffusers' ``FluxTransformer2DModel``: its named configs,
its checkpoint folders (a FLUX pipeline folder or just its ``transformer/``) and its ClusCa adapter.

The adapter's ``forward_step`` is diffusers' FLUX forward written against a step context, on
diffusers' own modules (no re-implementation of the weights' layout):

* double-stream block ``i``: the joint attention gives the image and the text stream's outputs
  in one call, ``ctx.branches(("attn_img", "attn_txt"), i, ...)``, forecast in partial steps;
  the image MLP and the text MLP are ``ctx.fresh_branch("mlp_img" | "mlp_txt", ...)`` on the
  fresh rows of the ``img`` and ``txt`` token groups;
* single-stream block ``j``: the joint output projection ``proj_out(cat(attn, mlp))`` is
  ``ctx.branch("single", j, ...)``, a pure forecast in partial steps;
* the image and the text stream after the last double block are the hidden states to cluster.

Modulation (shift, scale, gate from the timestep/guidance/pooled-text embedding) and every
residual add are redone every step. Shapes are static: the resolution (``height``, ``width``)
and the text length are build options; the rotary embeddings of the text and image positions
are a constant of the build.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ClusCaConfig
from ..errors import CheckpointError, ConfigError
from ..spec import BuildOptions, ExportSpec, TensorSpec
from . import diffusers_folder
from .checks import config_value
from .diffusers_folder import DiffusersFamily, block_modulations, double_block, final_norm, single_block
from .pipeline_call import PipelineBinding, TransformerCall, timestep_vector, unmodelled

log = logging.getLogger(__name__)

FAMILY = "flux"
MAX_TEXT_LENGTH = 512  # T5's limit in the FLUX pipeline
MAX_SIDE = 8192  # pixels (FLUX.1 is trained up to 2 MP)
BUILD_OPTIONS = ("height", "width", "text_length")
TRANSFORMER_CLASS = "FluxTransformer2DModel"
DIFFUSERS = DiffusersFamily(FAMILY, "FLUX", TRANSFORMER_CLASS, BUILD_OPTIONS, decoder_kind="vae")

# FlowMatchEulerDiscreteScheduler configs of the released checkpoints (used where a folder has none)
SCHEDULER_DEV = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHEDULER_SCHNELL = dict(SCHEDULER_DEV, shift=1.0, use_dynamic_shifting=False)


@dataclass(frozen=True)
class FluxConfig:
    """The transformer's architecture (diffusers' config names) and the build's static shapes."""

    in_channels: int = 64  # packed latent channels: 4 x the VAE's latent channels
    out_channels: int = 64
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5 hidden size
    pooled_projection_dim: int = 768  # CLIP pooled size
    guidance_embeds: bool = True  # dev: distilled guidance; schnell: none
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    height: int = 1024  # pixels
    width: int = 1024
    text_length: int = 512  # T5 tokens
    vae_scale_factor: int = 8
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER_DEV))

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        multiple = 2 * self.vae_scale_factor
        for side in ("height", "width"):
            v = getattr(self, side)
            if not isinstance(v, int) or isinstance(v, bool) or not multiple <= v <= MAX_SIDE or v % multiple:
                raise ConfigError(f"{side} must be a positive multiple of {multiple}, got {v!r} (at most {MAX_SIDE})")
        if not isinstance(self.text_length, int) or not 1 <= self.text_length <= MAX_TEXT_LENGTH:
            raise ConfigError(f"text length must be an integer in 1..{MAX_TEXT_LENGTH}, got {self.text_length!r}")
        if self.in_channels % 4:
            raise ConfigError(f"in_channels must be 4 x the latent channels, got {self.in_channels}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"axes_dims_rope must sum to the head dim {self.attention_head_dim}, got {list(self.axes_dims_rope)}"
            )
        if self.num_layers < 1:
            raise ConfigError(f"FLUX needs >= 1 double-stream block (its output is clustered), got {self.num_layers}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @property
    def latent_size(self) -> tuple[int, int]:
        """The VAE latent's (height, width), as diffusers' ``prepare_latents`` computes it."""
        f = self.vae_scale_factor
        return 2 * (self.height // (2 * f)), 2 * (self.width // (2 * f))

    @property
    def image_tokens(self) -> int:
        lh, lw = self.latent_size
        return (lh // 2) * (lw // 2)

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embeds else "schnell"

    @property
    def default_steps(self) -> int:
        return 50 if self.guidance_embeds else 4

    def transformer_config(self) -> dict:
        """Keyword arguments of diffusers' ``FluxTransformer2DModel``."""
        names = ("in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")
        return dict({n: getattr(self, n) for n in names}, patch_size=1, axes_dims_rope=self.axes_dims_rope)

    def replace(self, **changes) -> "FluxConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


_ARCH = ("in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
         "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")

NAMED_CONFIGS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(),
    "flux-schnell": FluxConfig(guidance_embeds=False, text_length=256, scheduler=dict(SCHEDULER_SCHNELL)),
    # A small config for tests and demos. Random weights: labelled as such wherever it is used.
    "flux-tiny": FluxConfig(
        in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        height=128, width=128, text_length=16,
    ),
}


# --------------------------------------------------------------------------------------------
# ClusCa adapter


def position_ids(cfg: FluxConfig) -> torch.Tensor:
    """Text positions (all zero) then image positions (0, row, column), as the FLUX pipeline makes them."""
    lh, lw = cfg.latent_size
    img = torch.zeros(lh // 2, lw // 2, 3)
    img[..., 1] = img[..., 1] + torch.arange(lh // 2)[:, None]
    img[..., 2] = img[..., 2] + torch.arange(lw // 2)[None, :]
    return torch.cat([torch.zeros(cfg.text_length, 3), img.reshape(-1, 3)], dim=0)


class FluxAdapter(nn.Module):
    """Where FLUX's blocks, branches, gates and tokens are."""

    family = FAMILY
    cfg_multiplier = 1  # guidance is distilled into the model (dev) or absent (schnell): one row per sample
    default_run = ClusCaConfig(interval=6, clusters=16, propagation=0.005, order=1, warmup=3)

    def __init__(self, model: nn.Module, cfg: FluxConfig):
        super().__init__()
        self.model = model.eval()
        self.cfg = cfg
        with torch.no_grad():
            cos, sin = model.pos_embed(position_ids(cfg))
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)

    def sampling_info(self) -> dict:
        """What sampling needs of this model (recorded in the manifest; the runtime reads only that)."""
        cfg = self.cfg
        return {
            "height": cfg.height, "width": cfg.width, "vae_scale_factor": cfg.vae_scale_factor,
            "latent_channels": cfg.latent_channels, "latent_size": list(cfg.latent_size),
            "image_tokens": cfg.image_tokens, "text_length": cfg.text_length, "text_dim": cfg.joint_attention_dim,
            "pooled_dim": cfg.pooled_projection_dim, "guidance_embeds": cfg.guidance_embeds,
            "default_steps": cfg.default_steps, "scheduler": dict(cfg.scheduler),
        }

    def export_spec(self, options: BuildOptions) -> ExportSpec:
        return export_spec(self.cfg, options)

    def conditioning(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From timestep, guidance, pooled CLIP and T5 embeddings alone: every block's modulation
        and the embedded text (``diffusers_folder.block_modulations``, ``context``)."""
        m = self.model
        timestep = inputs["timestep"] * 1000
        pooled = inputs["pooled_projections"]
        if self.cfg.guidance_embeds:
            temb = m.time_text_embed(timestep, inputs["guidance"] * 1000, pooled)
        else:
            temb = m.time_text_embed(timestep, pooled)
        return {**block_modulations(m, temb), "context": m.context_embedder(inputs["encoder_hidden_states"])}

    def forward_step(self, ctx, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        x = m.x_embedder(inputs["hidden_states"])
        c = inputs["context"]
        rope = (self.rope_cos, self.rope_sin)
        for i, blk in enumerate(m.transformer_blocks):
            x, c = double_block(ctx, i, blk, x, c, inputs["mod_double"][:, i], image_rotary_emb=rope)
        ctx.hidden("img", x)
        ctx.hidden("txt", c)
        h = torch.cat([c, x], dim=1)
        for j, blk in enumerate(m.single_transformer_blocks):
            h = single_block(ctx, j, blk, h, inputs["mod_single"][:, j],
                             lambda b, n: b.attn(hidden_states=n, image_rotary_emb=rope))
        return m.proj_out(final_norm(m, h[:, c.shape[1] :], inputs["mod_out"]))


def export_spec(cfg: FluxConfig, options: BuildOptions) -> ExportSpec:
    """The graphs of a build, from the config alone (no weights: the real model's spec is cheap)."""
    B = options.batch * FluxAdapter.cfg_multiplier
    T_img = cfg.image_tokens
    cond = [
        TensorSpec("encoder_hidden_states", (B, cfg.text_length, cfg.joint_attention_dim)),
        TensorSpec("pooled_projections", (B, cfg.pooled_projection_dim)),
        TensorSpec("timestep", (B,)),
    ]
    return diffusers_folder.export_spec(FAMILY, cfg, options, B, [TensorSpec("hidden_states", (B, T_img, cfg.in_channels))],
                                        T_img, (B, T_img, cfg.out_channels), cond)


# --------------------------------------------------------------------------------------------
# loading


def model_names() -> list[str]:
    return ["flux", *NAMED_CONFIGS]


def load(name: str, checkpoint=None, random_init: bool = False, seed: int = 0, **options):
    """The family entry point (see ``clusca_trt.models``): a ``LoadedModel`` for ``name``.

    ``options``: ``height``, ``width`` (pixels, multiples of 16) and ``text_length`` (T5 tokens);
    unset ones come from the named config (1024 x 1024; 512 tokens for dev, 256 for schnell).
    """
    return diffusers_folder.load(
        DIFFUSERS, name, checkpoint, random_init, seed, options,
        named_config=_random_init_config,
        folder_config=lambda folder, root: folder_config(folder, root, NAMED_CONFIGS.get(name)),
        adapter=FluxAdapter,
        build_name=lambda cfg: f"{cfg.height}x{cfg.width}",
    )


def _random_init_config(name: str) -> FluxConfig:
    if name == "flux":
        raise ConfigError("random_init needs a named config (flux-dev, flux-schnell, flux-tiny), got 'flux'")
    return NAMED_CONFIGS[name]


def init_random(cfg: FluxConfig, seed: int) -> nn.Module:
    """diffusers' own initialisation under ``seed`` (the global RNG is left as it was)."""
    return diffusers_folder.init_random(DIFFUSERS, cfg.transformer_config(), seed)


def folder_config(folder: Path, root: Path | None, expect: FluxConfig | None) -> FluxConfig:
    defaults = FluxConfig()
    raw, arch = diffusers_folder.architecture(folder, defaults, _ARCH)
    if raw.get("patch_size", 1) != 1:
        raise CheckpointError(f"expected a FLUX transformer with patch_size 1, got {raw.get('patch_size')}")
    base = expect or (defaults if arch["guidance_embeds"] else NAMED_CONFIGS["flux-schnell"])
    if expect is not None:
        for n in _ARCH:
            want, got = getattr(expect, n), arch[n]
            if (tuple(want) if n == "axes_dims_rope" else want) != (tuple(got) if n == "axes_dims_rope" else got):
                raise CheckpointError(f"checkpoint {folder} does not match the config: expected {n}={want}, got {got}")
    scheduler, vae = diffusers_folder.pipeline_configs(root)
    extra = {
        "scheduler": dict(base.scheduler) if scheduler is None else scheduler,
        "vae_scale_factor": 8 if vae is None else 2 ** (len(config_value(
            vae, "block_out_channels", "ints", [0] * 4, f"VAE config of {root}")) - 1),
    }
    return diffusers_folder.checked_config(DIFFUSERS, folder, base, **arch, **extra)


# --------------------------------------------------------------------------------------------
# inside a diffusers FluxPipeline (``clusca_trt.diffusers``)


def config_from_transformer(transformer: nn.Module, **changes) -> FluxConfig:
    """Our config of a live ``FluxTransformer2DModel`` (its ``config``), with ``changes`` (the static shapes)."""
    raw = dict(transformer.config)
    if raw.get("patch_size", 1) != 1:
        raise ConfigError(f"expected a FLUX transformer with patch_size 1, got {raw.get('patch_size')}")
    arch = diffusers_folder.architecture_from(raw, FluxConfig(), _ARCH, "the FLUX transformer's config")
    base = FluxConfig() if arch["guidance_embeds"] else NAMED_CONFIGS["flux-schnell"]
    return diffusers_folder.checked_config(DIFFUSERS, "the pipeline's transformer", base, **arch, **changes)


def image_grid(img_ids: torch.Tensor) -> tuple[int, int] | None:
    """(rows, columns) of the image tokens where ``img_ids`` [N, 3] is FluxPipeline's grid
    ``(0, row, column)`` in row-major order (``position_ids``), else None (reference images, another layout)."""
    if img_ids.ndim != 2 or img_ids.shape[1] != 3 or img_ids.shape[0] < 1:
        return None
    ids = img_ids.detach().to("cpu", torch.float32)
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * cols != ids.shape[0]:
        return None
    grid = torch.zeros(rows, cols, 3)
    grid[..., 1] += torch.arange(rows)[:, None]
    grid[..., 2] += torch.arange(cols)[None, :]
    return (rows, cols) if torch.equal(ids, grid.reshape(-1, 3)) else None


def pipeline_call(transformer: nn.Module, args: dict, pipe=None):
    """A ``FluxTransformer2DModel`` forward call as our inputs: the latents, the T5 and pooled CLIP
    embeddings, the timestep (``t / 1000``, as FluxPipeline feeds it) and the distilled guidance. The
    resolution comes from ``img_ids`` (FluxPipeline's grid; any other layout is not modelled, nor
    are ControlNet residuals or attention kwargs)."""
    reason = unmodelled(args, ("controlnet_block_samples", "controlnet_single_block_samples", "joint_attention_kwargs"))
    if reason:
        return reason
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")
    x, text, pooled, img_ids, txt_ids = (args.get(n) for n in names)
    if not all(isinstance(a, torch.Tensor) for a in (x, text, pooled, img_ids, txt_ids)):
        return "a call without " + ", ".join(names)
    rows = x.shape[0]
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    grid = image_grid(img_ids)
    if grid is None or x.ndim != 3 or x.shape[1] != grid[0] * grid[1]:
        return "image position ids other than FluxPipeline's grid of the latent tokens (reference images?)"
    if text.ndim != 3 or text.shape[0] != rows or pooled.ndim != 2 or pooled.shape[0] != rows:
        return "text embeddings without one row per latent row"
    if tuple(txt_ids.shape) != (text.shape[1], 3) or bool(txt_ids.any()):
        return "text position ids other than zeros"
    cond = {"encoder_hidden_states": text, "pooled_projections": pooled,
            "timestep": timestep_vector(args.get("timestep"), rows)}
    if transformer.config.guidance_embeds:
        cond["guidance"] = timestep_vector(args.get("guidance"), rows)
    if any(v is None for v in cond.values()):
        return "a call without one timestep (and guidance) per row"
    f = 2 * _vae_scale_factor(pipe)
    shape = {"height": grid[0] * f, "width": grid[1] * f, "text_length": text.shape[1]}
    return TransformerCall(rows, shape, {"hidden_states": x}, cond, "timestep", like=x)


def _vae_scale_factor(pipe) -> int:
    f = getattr(pipe, "vae_scale_factor", 8)
    return f if isinstance(f, int) and f >= 1 else 8


def pipeline_adapter(transformer: nn.Module, shape: dict, pipe=None) -> FluxAdapter:
    """The adapter over the pipeline's transformer (its modules, shared) for ``shape`` (height, width, text_length)."""
    return FluxAdapter(transformer, config_from_transformer(transformer, vae_scale_factor=_vae_scale_factor(pipe),
                                                            **shape))


def pipeline_timesteps(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """FluxPipeline feeds ``t.to(latents dtype) / 1000``."""
    return timesteps.to(like.dtype) / 1000


PIPELINE = PipelineBinding(TRANSFORMER_CLASS, FluxAdapter, pipeline_call, pipeline_adapter, pipeline_timesteps)


# --------------------------------------------------------------------------------------------
# FLOPs at the real size (analysis.flops carries counts of small probes to it)


def probe_adapter(cfg: FluxConfig, heads: int, double: int, single: int, seed: int = 0) -> FluxAdapter:
    """``cfg`` with ``heads`` heads and the given block counts, random weights (diffusers' initialisation)."""
    small = cfg.replace(num_attention_heads=heads, num_layers=double, num_single_layers=single)
    return FluxAdapter(init_random(small, seed), small)


def analytic_matmul_flops(cfg: FluxConfig, k_img: int, k_txt: int) -> dict[str, int]:
    """Matrix-product FLOPs per sample of one conditioning row (``cond``: one step's conditioning)
    and of one plain, full, partial and forecast step, 2 FLOPs per multiply-add (what
    ``analysis.flops.flux_flops``'s counts are checked against); T_i, T_t image and text tokens,
    T = T_i + T_t, D hidden, F = 4D the MLP hidden size:

    * cond, per row: timestep (and guidance) embedding 2 (256 D + D^2) each; pooled-text embedding
      2 (P D + D^2); modulation 2 D 6D twice per double block, 2 D 3D per single block, 2 D 2D for
      the final norm; context_embedder 2 T_t J D. The linears on [rows, D] are exported as ``Gemm``,
      whose bias add the counter puts in the matmul category: one FLOP per output of each;
    * every step: x_embedder 2 T_i C_in D; proj_out 2 T_i D C_out;
    * full (and plain) step, per double block: q, k, v, out of both streams 8 T D^2; joint attention
      2 x 2 T^2 D (Q K^T and A V over all heads); the two MLPs 2 x 2 T D F; per single block: q, k,
      v 6 T D^2, proj_mlp 2 T D F, proj_out 2 T (D + F) D, attention 4 T^2 D;
    * partial step, per double block: the two MLPs on their fresh rows only, 4 (K_img + K_txt) D F;
      no attention anywhere and nothing in a single block (its output is forecast).

    Element-wise work (norms, rotary embeddings, gates, the Taylor forecast and propagation) is in the
    counter's totals only. The forecast's sum over the Taylor orders is a MatMul over the orders in
    the graphs (``ops.taylor_forecast``), so with O >= 1 the counter's matmul category holds
    that too; at O = 0 the two agree exactly (a test checks it).
    """
    ti, tt = cfg.image_tokens, cfg.text_length
    t, d = ti + tt, cfg.hidden_size
    f = 4 * d
    l2, l1 = cfg.num_layers, cfg.num_single_layers
    guided = 2 if cfg.guidance_embeds else 1
    embeddings = 2 * (256 * d + d * d) * guided + 2 * (cfg.pooled_projection_dim * d + d * d)
    gemm_bias = 2 * d * guided + 2 * d + l2 * 2 * 6 * d + l1 * 3 * d + 2 * d
    modulation = l2 * 2 * (2 * d * 6 * d) + l1 * 2 * d * 3 * d + 2 * d * 2 * d
    cond = embeddings + gemm_bias + modulation + 2 * tt * cfg.joint_attention_dim * d
    every = 2 * ti * cfg.in_channels * d + 2 * ti * d * cfg.out_channels
    double_full = 8 * t * d * d + 4 * t * t * d + 4 * t * d * f
    single_full = 6 * t * d * d + 2 * t * d * f + 2 * t * (d + f) * d + 4 * t * t * d
    full = every + l2 * double_full + l1 * single_full
    return {
        "cond": cond,
        "plain": full,
        "full": full,
        "partial": every + l2 * 4 * (k_img + k_txt) * d * f,
        "forecast": every,
    }
