"""HunyuanVideo (Tencent) text-to-video through diffusers' ``HunyuanVideoTransformer3DModel``: its
named configs, its checkpoint folders (a ``HunyuanVideoPipeline`` folder or just its
``transformer/``) and its ClusCa adapter.

The adapter's ``forward_step`` is diffusers' HunyuanVideo forward written against a step context,
on diffusers' own modules:

* conditioning (timestep + embedded guidance + CLIP pooled text) and the token refiner (text
  self-attention over the Llama tokens) run every step: they are small and exact;
* dual-stream block ``i``: the joint attention gives the video and the text stream's outputs in
  one call, ``ctx.branches(("attn_img", "attn_txt"), i, ...)``, forecast in partial steps; the
  video MLP and the text MLP are ``ctx.fresh_branch("mlp_img" | "mlp_txt", ...)`` on the fresh
  rows of the ``img`` and ``txt`` token groups (each stream's cache gets its own stream's outputs:
  the reference code writes the video MLP outputs into the text cache, a bug not reproduced);
* single-stream block ``j``: the joint output projection ``proj_out(cat(attn, mlp))`` over
  ``[video | text]`` tokens is ``ctx.branch("single", j, ...)``, a pure forecast in partial steps;
* the video and the text stream after the last dual-stream block are the hidden states to cluster.

Attention masks: diffusers builds the joint mask with a boolean ``masked_fill`` and the refiner
mask with a boolean in-place write; both export as a boolean ``Where`` (or ``ScatterND``) that ONNX
Runtime has no kernel for. ``joint_attention_mask`` and ``refiner_attention_mask`` compute the
same boolean masks with comparisons, ``And`` and ``Or`` only (the tests check they are equal).

Shapes are static: the resolution (``height``, ``width``), the frame count (``frames``) and the
text length are build options; the 3D rotary embeddings of the video positions are a constant
of the build.
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
from .diffusers_folder import DiffusersFamily, block_modulations, double_block, final_norm, single_block
from .pipeline_call import PipelineBinding, TransformerCall, timestep_vector, unmodelled

log = logging.getLogger(__name__)

FAMILY = "hunyuan-video"
TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModel"
MAX_TEXT_LENGTH = 1024
MAX_SIDE = 8192  # pixels
MAX_FRAMES = 1025  # video frames (4 k + 1)
BUILD_OPTIONS = ("height", "width", "frames", "text_length")
DIFFUSERS = DiffusersFamily(FAMILY, "HunyuanVideo", TRANSFORMER_CLASS, BUILD_OPTIONS, decoder_kind="video-vae")

# the FlowMatchEulerDiscreteScheduler of the released pipeline (used where a folder has none)
SCHEDULER = {"num_train_timesteps": 1000, "shift": 7.0}

_ARCH = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
         "num_single_layers", "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm",
         "guidance_embeds", "text_embed_dim", "pooled_projection_dim", "rope_theta", "rope_axes_dim")


@dataclass(frozen=True)
class HunyuanVideoConfig:
    """The transformer's architecture (diffusers' config names) and the build's static shapes."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096  # Llama hidden size
    pooled_projection_dim: int = 768  # CLIP pooled size
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    height: int = 480  # pixels
    width: int = 640
    frames: int = 65  # video frames
    text_length: int = 256  # Llama tokens after the prompt template is cropped
    vae_scale_factor: int = 8  # spatial compression of the VAE
    vae_temporal_factor: int = 4
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER))

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_axes_dim", tuple(int(a) for a in self.rope_axes_dim))
        multiple = self.vae_scale_factor * self.patch_size
        for side in ("height", "width"):
            v = getattr(self, side)
            if not isinstance(v, int) or isinstance(v, bool) or not multiple <= v <= MAX_SIDE or v % multiple:
                raise ConfigError(f"{side} must be a positive multiple of {multiple}, got {v!r} (at most {MAX_SIDE})")
        tf = self.vae_temporal_factor
        if (not isinstance(self.frames, int) or isinstance(self.frames, bool) or not 1 <= self.frames <= MAX_FRAMES
                or (self.frames - 1) % tf):
            raise ConfigError(f"frames must be {tf} k + 1 (1, {tf + 1}, {2 * tf + 1}, ...), got {self.frames!r} "
                              f"(at most {MAX_FRAMES})")
        if self.latent_frames % self.patch_size_t:
            raise ConfigError(
                f"latent frames must be a multiple of patch_size_t {self.patch_size_t}, got {self.latent_frames}"
            )
        if not isinstance(self.text_length, int) or not 1 <= self.text_length <= MAX_TEXT_LENGTH:
            raise ConfigError(f"text length must be an integer in 1..{MAX_TEXT_LENGTH}, got {self.text_length!r}")
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ConfigError(
                f"rope_axes_dim must sum to the head dim {self.attention_head_dim}, got {list(self.rope_axes_dim)}"
            )
        if self.num_layers < 1:
            raise ConfigError(
                f"HunyuanVideo needs >= 1 dual-stream block (its output is clustered), got {self.num_layers}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // self.vae_temporal_factor + 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """The VAE latent of one video: (channels, frames, height, width), as ``prepare_latents`` makes it."""
        f = self.vae_scale_factor
        return self.in_channels, self.latent_frames, self.height // f, self.width // f

    @property
    def video_tokens(self) -> int:
        _, lf, lh, lw = self.latent_shape
        return (lf // self.patch_size_t) * (lh // self.patch_size) * (lw // self.patch_size)

    def transformer_config(self) -> dict:
        """Keyword arguments of diffusers' ``HunyuanVideoTransformer3DModel``."""
        return {n: getattr(self, n) for n in _ARCH}

    def replace(self, **changes) -> "HunyuanVideoConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        return d


NAMED_CONFIGS: dict[str, HunyuanVideoConfig] = {
    "hunyuan-video": HunyuanVideoConfig(),
    # A small config for tests and demos. Random weights: labelled as such wherever it is used.
    "hunyuan-video-tiny": HunyuanVideoConfig(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4), height=64, width=64, frames=9, text_length=16,
    ),
}


# --------------------------------------------------------------------------------------------
# masks without boolean Where


def joint_attention_mask(text_mask: torch.Tensor, video_tokens: int) -> torch.Tensor:
    """The joint attention's key mask [B, 1, 1, video + text]: True for every video token and the
    first ``sum(text_mask)`` text tokens. diffusers' forward computes the same with
    ``ones(...).masked_fill(index >= length, False)``."""
    n = video_tokens + text_mask.shape[1]
    length = video_tokens + text_mask.sum(dim=1, dtype=torch.int)
    index = torch.arange(n, device=text_mask.device).unsqueeze(0)
    return (index < length.unsqueeze(1)).unsqueeze(1).unsqueeze(1)


def refiner_attention_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """The token refiner's self-attention mask [B, 1, T, T]: query and key both valid, and key 0
    always. diffusers' refiner computes the same with an in-place boolean write ``mask[..., 0] = True``."""
    valid = text_mask.bool()
    first = torch.arange(text_mask.shape[1], device=text_mask.device) == 0
    return (valid[:, None, :, None] & valid[:, None, None, :]) | first[None, None, None, :]


# --------------------------------------------------------------------------------------------
# ClusCa adapter


def rotary_embedding(model: nn.Module, cfg: HunyuanVideoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3D rotary (cos, sin) of the video positions: a constant of the static shape."""
    with torch.no_grad():
        cos, sin = model.rope(torch.empty(1, *cfg.latent_shape))
    return cos.float(), sin.float()


class HunyuanVideoAdapter(nn.Module):
    """Where HunyuanVideo's blocks, branches, gates and tokens are."""

    family = FAMILY
    cfg_multiplier = 1  # guidance is embedded (distilled) in the model: one row per sample
    default_run = ClusCaConfig(interval=5, clusters=32, propagation=0.01, order=1, warmup=1)

    def __init__(self, model: nn.Module, cfg: HunyuanVideoConfig):
        super().__init__()
        self.model = model.eval()
        self.cfg = cfg
        cos, sin = rotary_embedding(model, cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def sampling_info(self) -> dict:
        """What sampling needs of this model (recorded in the manifest; the runtime reads only that)."""
        cfg = self.cfg
        return {
            "latent_shape": list(cfg.latent_shape), "text_length": cfg.text_length, "text_dim": cfg.text_embed_dim,
            "pooled_dim": cfg.pooled_projection_dim, "guidance_embeds": cfg.guidance_embeds,
            "scheduler": dict(cfg.scheduler),
        }

    def export_spec(self, options: BuildOptions) -> ExportSpec:
        return export_spec(self.cfg, options)

    def conditioning(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From timestep, guidance, pooled CLIP and Llama embeddings alone: every block's modulation,
        the refined text (``context``) and the text mask (passed through for the joint attention)."""
        m = self.model
        text_mask = inputs["encoder_attention_mask"]
        temb, _ = m.time_text_embed(inputs["timestep"], inputs["pooled_projections"], inputs.get("guidance"))
        context = self._refine_text(inputs["encoder_hidden_states"], inputs["timestep"], text_mask)
        return {**block_modulations(m, temb), "context": context, "text_mask": text_mask}

    def forward_step(self, ctx, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        video = inputs["hidden_states"]
        B = video.shape[0]
        x = m.x_embedder(video)
        c = inputs["context"]
        mask = joint_attention_mask(inputs["text_mask"], x.shape[1])
        rope = (self.rope_cos, self.rope_sin)
        for i, blk in enumerate(m.transformer_blocks):
            x, c = double_block(ctx, i, blk, x, c, inputs["mod_double"][:, i], attention_mask=mask,
                                image_rotary_emb=rope)
        ctx.hidden("img", x)
        ctx.hidden("txt", c)
        h = torch.cat([x, c], dim=1)
        text_tokens = c.shape[1]

        def attention(blk, n):  # over [video | text]: diffusers' single-stream attention takes them apart
            a_img, a_txt = blk.attn(
                hidden_states=n[:, :-text_tokens],
                encoder_hidden_states=n[:, -text_tokens:],
                attention_mask=mask,
                image_rotary_emb=rope,
            )
            return torch.cat([a_img, a_txt], dim=1)

        for j, blk in enumerate(m.single_transformer_blocks):
            h = single_block(ctx, j, blk, h, inputs["mod_single"][:, j], attention)
        out = m.proj_out(final_norm(m, h[:, : x.shape[1]], inputs["mod_out"]))
        return self._unpatchify(out, B)

    def _refine_text(self, text: torch.Tensor, timestep: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """diffusers' ``HunyuanVideoTokenRefiner.forward`` with the refiner mask built without a boolean write."""
        refiner = self.model.context_embedder
        weight = text_mask.float().unsqueeze(-1)
        pooled = (text * weight).sum(dim=1) / weight.sum(dim=1)
        temb = refiner.time_text_embed(timestep, pooled.to(text.dtype))
        h = refiner.proj_in(text)
        mask = refiner_attention_mask(text_mask)
        for block in refiner.token_refiner.refiner_blocks:
            h = block(h, temb, mask)
        return h

    def _unpatchify(self, out: torch.Tensor, batch: int) -> torch.Tensor:
        cfg = self.cfg
        p, pt = cfg.patch_size, cfg.patch_size_t
        _, lf, lh, lw = cfg.latent_shape
        out = out.reshape(batch, lf // pt, lh // p, lw // p, -1, pt, p, p)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def export_spec(cfg: HunyuanVideoConfig, options: BuildOptions) -> ExportSpec:
    """The graphs of a build, from the config alone (no weights: the real model's spec is cheap)."""
    B = options.batch * HunyuanVideoAdapter.cfg_multiplier
    T_txt = cfg.text_length
    cond = [
        TensorSpec("encoder_hidden_states", (B, T_txt, cfg.text_embed_dim)),
        TensorSpec("encoder_attention_mask", (B, T_txt)),
        TensorSpec("pooled_projections", (B, cfg.pooled_projection_dim)),
        TensorSpec("timestep", (B,)),
    ]
    output_shape = (B, cfg.out_channels, *cfg.latent_shape[1:])
    return diffusers_folder.export_spec(FAMILY, cfg, options, B, [TensorSpec("hidden_states", (B, *cfg.latent_shape))],
                                        cfg.video_tokens, output_shape, cond,
                                        extra_cond=[TensorSpec("text_mask", (B, T_txt))])


# --------------------------------------------------------------------------------------------
# loading


def model_names() -> list[str]:
    return list(NAMED_CONFIGS)


def load(name: str, checkpoint=None, random_init: bool = False, seed: int = 0, **options):
    """The family entry point (see ``clusca_trt.models``): a ``LoadedModel`` for ``name``.

    ``options``: ``height``, ``width`` (pixels, multiples of 16), ``frames`` (4 k + 1) and
    ``text_length`` (Llama tokens); unset ones come from the named config (480 x 640, 65 frames,
    256 tokens). With a checkpoint the architecture is read from the folder.
    """
    return diffusers_folder.load(
        DIFFUSERS, name, checkpoint, random_init, seed, options,
        named_config=NAMED_CONFIGS.__getitem__,
        folder_config=lambda folder, root: folder_config(folder, root, NAMED_CONFIGS[name]),
        adapter=HunyuanVideoAdapter,
        build_name=lambda cfg: f"{cfg.height}x{cfg.width}x{cfg.frames}",
    )


def init_random(cfg: HunyuanVideoConfig, seed: int) -> nn.Module:
    """diffusers' own initialisation under ``seed`` (the global RNG is left as it was)."""
    return diffusers_folder.init_random(DIFFUSERS, cfg.transformer_config(), seed)


def folder_config(folder: Path, root: Path | None, base: HunyuanVideoConfig) -> HunyuanVideoConfig:
    raw, arch = diffusers_folder.architecture(folder, HunyuanVideoConfig(), _ARCH)
    if raw.get("image_condition_type") is not None:
        raise CheckpointError(
            f"expected a text-to-video HunyuanVideo transformer (image_condition_type null), got "
            f"{raw['image_condition_type']!r} (image-to-video) in {folder}"
        )
    scheduler, vae = diffusers_folder.pipeline_configs(root)
    extra: dict = {"scheduler": dict(base.scheduler) if scheduler is None else scheduler}
    if vae is not None:
        extra["vae_scale_factor"] = vae.get("spatial_compression_ratio", 8)
        extra["vae_temporal_factor"] = vae.get("temporal_compression_ratio", 4)
    return diffusers_folder.checked_config(DIFFUSERS, folder, base, **arch, **extra)


def probe_adapter(cfg: HunyuanVideoConfig, heads: int, double: int, single: int, seed: int = 0) -> "HunyuanVideoAdapter":
    """``cfg`` with ``heads`` heads and the given block counts, random weights (for ``analysis.flops``)."""
    small = cfg.replace(num_attention_heads=heads, num_layers=double, num_single_layers=single)
    return HunyuanVideoAdapter(init_random(small, seed), small)


# --------------------------------------------------------------------------------------------
# inside a diffusers HunyuanVideoPipeline (``clusca_trt.diffusers``)


def config_from_transformer(transformer: nn.Module, **changes) -> HunyuanVideoConfig:
    """Our config of a live ``HunyuanVideoTransformer3DModel`` (its ``config``), with ``changes`` (the static shapes)."""
    arch = diffusers_folder.architecture_from(dict(transformer.config), HunyuanVideoConfig(), _ARCH,
                                              "the HunyuanVideo transformer's config")
    return diffusers_folder.checked_config(DIFFUSERS, "the pipeline's transformer", NAMED_CONFIGS["hunyuan-video"],
                                           **arch, **changes)


def _vae_factors(pipe) -> tuple[int, int]:
    out = []
    for name, default in (("vae_scale_factor_spatial", 8), ("vae_scale_factor_temporal", 4)):
        f = getattr(pipe, name, default)
        out.append(f if isinstance(f, int) and f >= 1 else default)
    return out[0], out[1]


def pipeline_call(transformer: nn.Module, args: dict, pipe=None):
    """A ``HunyuanVideoTransformer3DModel`` forward call as our inputs: the video latents, the Llama
    embeddings and their mask, the pooled CLIP embedding, the timestep and the embedded guidance
    (``guidance * 1000``, as HunyuanVideoPipeline feeds it). Attention kwargs and image-to-video
    conditioning are not modelled."""
    reason = unmodelled(args, ("attention_kwargs",))
    if reason:
        return reason
    if transformer.config.get("image_condition_type") is not None:
        return f"image-to-video conditioning ({transformer.config.image_condition_type})"
    names = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
    x, text, mask, pooled = (args.get(n) for n in names)
    if not all(isinstance(a, torch.Tensor) for a in (x, text, mask, pooled)):
        return "a call without " + ", ".join(names)
    rows = x.shape[0]
    if x.ndim != 5 or text.ndim != 3 or tuple(mask.shape) != tuple(text.shape[:2]) or pooled.ndim != 2 \
            or text.shape[0] != rows or pooled.shape[0] != rows:
        return "latents, text embeddings and mask without one row per latent row"
    c = transformer.config
    frames, height, width = x.shape[2:]
    if frames % c.patch_size_t or height % c.patch_size or width % c.patch_size:
        return f"latents of {frames} x {height} x {width}, not multiples of the transformer's patch"
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask, "pooled_projections": pooled,
            "timestep": timestep_vector(args.get("timestep"), rows)}
    if c.guidance_embeds:
        cond["guidance"] = timestep_vector(args.get("guidance"), rows)
    if any(v is None for v in cond.values()):
        return "a call without one timestep (and guidance) per row"
    fs, ft = _vae_factors(pipe)
    shape = {"height": height * fs, "width": width * fs, "frames": (frames - 1) * ft + 1, "text_length": text.shape[1]}
    return TransformerCall(rows, shape, {"hidden_states": x}, cond, "timestep", like=x)


def pipeline_adapter(transformer: nn.Module, shape: dict, pipe=None) -> HunyuanVideoAdapter:
    """The adapter over the pipeline's transformer (its modules, shared) for ``shape``."""
    fs, ft = _vae_factors(pipe)
    return HunyuanVideoAdapter(transformer, config_from_transformer(
        transformer, vae_scale_factor=fs, vae_temporal_factor=ft, **shape))


def pipeline_timesteps(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """HunyuanVideoPipeline feeds ``t.to(latents dtype)`` (float32 latents)."""
    return timesteps.to(like.dtype)


PIPELINE = PipelineBinding(TRANSFORMER_CLASS, HunyuanVideoAdapter, pipeline_call, pipeline_adapter, pipeline_timesteps)
