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
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import ClusCaConfig
from ..errors import CheckpointError, ConfigError
from ..hashing import tree_sha256
from ..spec import BuildOptions, CacheSlot, ExportSpec, TensorSpec, TokenGroup, make_spec
from .flux import _modulate, _modulation

log = logging.getLogger(__name__)

FAMILY = "hunyuan-video"
TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModel"
MAX_TEXT_LENGTH = 1024
BUILD_OPTIONS = ("height", "width", "frames", "text_length")

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
            if not isinstance(v, int) or v < multiple or v % multiple:
                raise ConfigError(f"{side} must be a positive multiple of {multiple}, got {v!r}")
        tf = self.vae_temporal_factor
        if not isinstance(self.frames, int) or self.frames < 1 or (self.frames - 1) % tf:
            raise ConfigError(f"frames must be {tf} k + 1 (1, {tf + 1}, {2 * tf + 1}, ...), got {self.frames!r}")
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

    def export_spec(self, options: BuildOptions) -> ExportSpec:
        return export_spec(self.cfg, options)

    def forward_step(self, ctx, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        video = inputs["hidden_states"]
        B = video.shape[0]
        text_mask = inputs["encoder_attention_mask"]
        temb, _ = m.time_text_embed(inputs["timestep"], inputs["pooled_projections"], inputs.get("guidance"))
        x = m.x_embedder(video)
        c = self._refine_text(inputs["encoder_hidden_states"], inputs["timestep"], text_mask)
        mask = joint_attention_mask(text_mask, x.shape[1])
        rope = (self.rope_cos, self.rope_sin)
        for i, blk in enumerate(m.transformer_blocks):
            x, c = self._double_block(ctx, i, blk, x, c, temb, mask, rope)
        ctx.hidden("img", x)
        ctx.hidden("txt", c)
        h = torch.cat([x, c], dim=1)
        for j, blk in enumerate(m.single_transformer_blocks):
            h = self._single_block(ctx, j, blk, h, c.shape[1], temb, mask, rope)
        out = m.proj_out(m.norm_out(h[:, : x.shape[1]], temb))
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

    @staticmethod
    def _double_block(ctx, i, blk, x, c, temb, mask, rope):
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = _modulation(blk.norm1, temb, 6)
        ts_msa, tc_msa, tg_msa, ts_mlp, tc_mlp, tg_mlp = _modulation(blk.norm1_context, temb, 6)

        def joint_attention():
            return blk.attn(
                hidden_states=_modulate(x, blk.norm1.norm, s_msa, c_msa),
                encoder_hidden_states=_modulate(c, blk.norm1_context.norm, ts_msa, tc_msa),
                attention_mask=mask,
                image_rotary_emb=rope,
            )

        a_img, a_txt = ctx.branches(("attn_img", "attn_txt"), i, joint_attention)
        x = x + a_img * g_msa.unsqueeze(1)
        c = c + a_txt * tg_msa.unsqueeze(1)
        f = ctx.fresh_branch("mlp_img", i, x, lambda rows: blk.ff(_modulate(rows, blk.norm2, s_mlp, c_mlp)))
        x = x + g_mlp.unsqueeze(1) * f
        f = ctx.fresh_branch(
            "mlp_txt", i, c, lambda rows: blk.ff_context(_modulate(rows, blk.norm2_context, ts_mlp, tc_mlp))
        )
        c = c + tg_mlp.unsqueeze(1) * f
        return x, c

    @staticmethod
    def _single_block(ctx, j, blk, h, text_tokens, temb, mask, rope):
        shift, scale, gate = _modulation(blk.norm, temb, 3)

        def joint_output():
            n = _modulate(h, blk.norm.norm, shift, scale)
            mlp = blk.act_mlp(blk.proj_mlp(n))
            a_img, a_txt = blk.attn(
                hidden_states=n[:, :-text_tokens],
                encoder_hidden_states=n[:, -text_tokens:],
                attention_mask=mask,
                image_rotary_emb=rope,
            )
            return blk.proj_out(torch.cat([torch.cat([a_img, a_txt], dim=1), mlp], dim=2))

        return gate.unsqueeze(1) * ctx.branch("single", j, joint_output) + h


def export_spec(cfg: HunyuanVideoConfig, options: BuildOptions) -> ExportSpec:
    """The graphs of a build, from the config alone (no weights: the real model's spec is cheap)."""
    B = options.batch * HunyuanVideoAdapter.cfg_multiplier
    T_img, T_txt, D = cfg.video_tokens, cfg.text_length, cfg.hidden_size
    inputs = [
        TensorSpec("hidden_states", (B, *cfg.latent_shape)),
        TensorSpec("encoder_hidden_states", (B, T_txt, cfg.text_embed_dim)),
        TensorSpec("encoder_attention_mask", (B, T_txt)),
        TensorSpec("pooled_projections", (B, cfg.pooled_projection_dim)),
        TensorSpec("timestep", (B,)),
    ]
    if cfg.guidance_embeds:
        inputs.append(TensorSpec("guidance", (B,)))
    L2, L1 = cfg.num_layers, cfg.num_single_layers
    slots = [
        CacheSlot("attn_img", L2, T_img, D),
        CacheSlot("attn_txt", L2, T_txt, D),
        CacheSlot("mlp_img", L2, T_img, D, fresh_group="img"),
        CacheSlot("mlp_txt", L2, T_txt, D, fresh_group="txt"),
    ]
    if L1:
        slots.append(CacheSlot("single", L1, T_img + T_txt, D))
    k_txt = options.clusters if options.text_clusters is None else options.text_clusters
    groups = [TokenGroup("img", T_img, D, options.clusters), TokenGroup("txt", T_txt, D, k_txt)]
    return make_spec(FAMILY, options, inputs, slots, groups, B, (B, cfg.out_channels, *cfg.latent_shape[1:]))


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
    from . import LoadedModel

    unknown = sorted(set(options) - set(BUILD_OPTIONS))
    if unknown:
        raise ConfigError(f"HunyuanVideo build options are {', '.join(BUILD_OPTIONS)}, got {', '.join(unknown)}")
    if checkpoint is None and not random_init:
        raise ConfigError(f"model {name} needs a checkpoint folder (or random_init for tests), got neither")
    decoder = None
    if random_init:
        cfg = _with_options(NAMED_CONFIGS[name], options)
        log.warning("model %s has RANDOM weights (random_init, seed %d): not for real use", name, seed)
        model = init_random(cfg, seed)
        source = {"kind": "random-init", "seed": seed}
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: expected a HunyuanVideo folder at {path}")
        folder = transformer_dir(path)
        root = pipeline_dir(path)
        cfg = _with_options(folder_config(folder, root, NAMED_CONFIGS[name]), options)
        model = load_transformer(folder)
        if root is not None and (root / "vae" / "config.json").is_file():
            decoder = {"kind": "video-vae", "path": str((root / "vae").resolve())}
        log.info("hashing checkpoint %s", folder)
        source = {"kind": "diffusers", "path": str(path.resolve()), "sha256": tree_sha256(folder)}
    chosen = {k: getattr(cfg, k) for k in BUILD_OPTIONS}
    return LoadedModel(
        name, FAMILY, HunyuanVideoAdapter(model, cfg), cfg.to_dict(), source, options=chosen, decoder=decoder,
        build_name=f"{cfg.height}x{cfg.width}x{cfg.frames}",
    )


def _with_options(cfg: HunyuanVideoConfig, options: dict) -> HunyuanVideoConfig:
    return cfg.replace(**options) if options else cfg


def init_random(cfg: HunyuanVideoConfig, seed: int) -> nn.Module:
    """diffusers' own initialisation under ``seed`` (the global RNG is left as it was)."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HunyuanVideoTransformer3DModel(**cfg.transformer_config()).eval()


def transformer_dir(path: Path) -> Path:
    """The ``HunyuanVideoTransformer3DModel`` folder: ``path`` itself or ``path/transformer``."""
    for folder in (path, path / "transformer"):
        config = folder / "config.json"
        if config.is_file():
            try:
                cls = json.loads(config.read_text()).get("_class_name")
            except ValueError as e:
                raise CheckpointError(f"{config} is not readable JSON: {e}".splitlines()[0]) from e
            if cls != TRANSFORMER_CLASS:
                raise CheckpointError(f"expected a {TRANSFORMER_CLASS} config in {folder}, got {cls}")
            return folder
    raise CheckpointError(
        f"expected a HunyuanVideo pipeline folder (transformer/config.json) or a {TRANSFORMER_CLASS} folder "
        f"(config.json) at {path}, got neither"
    )


def pipeline_dir(path: Path) -> Path | None:
    """The pipeline folder around the transformer (text encoders, VAE, scheduler), if there is one."""
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        return path
    if path.name == "transformer" and (path.parent / "model_index.json").is_file():
        return path.parent
    return None


def folder_config(folder: Path, root: Path | None, base: HunyuanVideoConfig) -> HunyuanVideoConfig:
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("image_condition_type") is not None:
        raise CheckpointError(
            f"expected a text-to-video HunyuanVideo transformer (image_condition_type null), got "
            f"{raw['image_condition_type']!r} (image-to-video) in {folder}"
        )
    defaults = HunyuanVideoConfig()
    arch = {n: raw.get(n, getattr(defaults, n)) for n in _ARCH}
    arch["out_channels"] = arch["out_channels"] or arch["in_channels"]
    extra: dict = {"scheduler": dict(base.scheduler)}
    if root is not None:
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            extra["scheduler"] = {k: v for k, v in json.loads(sched.read_text()).items() if not k.startswith("_")}
        vae = root / "vae" / "config.json"
        if vae.is_file():
            raw_vae = json.loads(vae.read_text())
            extra["vae_scale_factor"] = raw_vae.get("spatial_compression_ratio", 8)
            extra["vae_temporal_factor"] = raw_vae.get("temporal_compression_ratio", 4)
    try:
        return base.replace(**arch, **extra)
    except ConfigError as e:
        raise CheckpointError(f"unsupported HunyuanVideo config in {folder}: {e}") from e


def load_transformer(folder: Path) -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    try:
        return HunyuanVideoTransformer3DModel.from_pretrained(str(folder)).eval()
    except Exception as e:  # diffusers raises many types for a bad folder
        raise CheckpointError(
            f"cannot load HunyuanVideo transformer from {folder}: {type(e).__name__}: {e}".splitlines()[0]
        ) from e
