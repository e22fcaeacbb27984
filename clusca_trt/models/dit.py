"""DiT (Peebles & Xie): the original architecture, its named configs, its two checkpoint
formats (the original ``DiT-XL-2-256x256.pt`` state dict and diffusers'
``DiTTransformer2DModel`` folders) and its ClusCa adapter.

The adapter's ``forward_step`` is the DiT forward written against a step context: per block,
the attention branch goes through ``ctx.branch`` and the MLP branch through
``ctx.fresh_branch``; gates and the residual adds are redone every step; the residual stream
after the last block is the hidden state to cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ClusCaConfig
from ..errors import CheckpointError, ConfigError, describe
from ..hashing import tree_sha256
from ..spec import BuildOptions, CacheSlot, ExportSpec, TensorSpec, TokenGroup, make_spec
from .checks import check_safetensors_dtypes, check_state_dict, config_value, read_config
from .pipeline_call import PipelineBinding, TransformerCall, timestep_vector, unmodelled

log = logging.getLogger(__name__)

FAMILY = "dit"
TRANSFORMER_CLASS = "DiTTransformer2DModel"  # diffusers' DiT, what DiTPipeline runs


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent side
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    time_freq_shift: int = 0  # diffusers' DiT embeds timesteps with downscale_freq_shift=1
    mlp_norm_eps: float = 1e-6  # diffusers' DiT uses its norm_eps (1e-5) before the MLP

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"input size must be divisible by the patch size {self.patch_size}, got {self.input_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden size must be divisible by {self.num_heads} heads, got {self.hidden_size}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SIZES = {"xl": (28, 1152, 16), "l": (24, 1024, 16), "b": (12, 768, 12), "s": (12, 384, 6)}

NAMED_CONFIGS: dict[str, DiTConfig] = {}
for _size, (_depth, _hidden, _heads) in _SIZES.items():
    for _res, _suffix in ((256, ""), (512, "-512")):
        NAMED_CONFIGS[f"dit-{_size}-2{_suffix}"] = DiTConfig(
            input_size=_res // 8, patch_size=2, hidden_size=_hidden, depth=_depth, num_heads=_heads
        )
# A small config for tests, demos and CI. Random weights: labelled as such wherever it is used.
NAMED_CONFIGS["dit-tiny"] = DiTConfig(
    input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10
)
# The built-in trained model: pixel space, scikit-learn's digits upscaled to 32x32 (one channel,
# patch 2: 256 tokens, DiT-XL/2's token grid at 256 px), eps only. Trained by
# benchmarks/train_digits.py; the weights ship in clusca_trt/data.
NAMED_CONFIGS["dit-digits"] = DiTConfig(
    input_size=32, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=2, num_classes=10,
    learn_sigma=False,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# named configs with weights inside the package: name -> file in DATA_DIR (an original-format state dict)
BUILTIN_WEIGHTS = {"dit-digits": "dit-digits.safetensors"}
# named configs whose outputs are pixels in [-1, 1], not VAE latents
PIXEL_MODELS = frozenset({"dit-digits"})


# --------------------------------------------------------------------------------------------
# the original architecture


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, shift: int = 0, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """The fixed 2D sin-cos position embedding of DiT/MAE: [grid*grid, dim]."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, shift: int = 0):
        super().__init__()
        self.freq_dim, self.shift = freq_dim, shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, self.shift))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row: the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q * self.scale, k.transpose(-2, -1)), dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def attn_branch(self, x, shift, scale):
        return self.attn(modulate(self.norm1(x), shift, scale))

    def mlp_branch(self, x, shift, scale):
        return self.mlp(modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_msa.unsqueeze(1) * self.attn_branch(x, s_msa, c_msa)
        return x + g_mlp.unsqueeze(1) * self.mlp_branch(x, s_mlp, c_mlp)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """The original DiT; ``forward(x, t, y)`` returns ``[B, out_channels, H, W]``."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.input_size // cfg.patch_size
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, shift=cfg.time_freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size)
        pos = torch.from_numpy(sincos_pos_embed(cfg.hidden_size, grid)).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)

    def embed(self, x, t, y):
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.cfg.out_channels, self.cfg.patch_size
        h = w = self.cfg.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def init_random(model: DiT, seed: int) -> DiT:
    """Random weights for tests and benchmarks. The zero-initialised adaLN of a fresh DiT would
    make every block the identity, so every weight gets a small random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = p.shape[-1] if p.ndim > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


# --------------------------------------------------------------------------------------------
# ClusCa adapter


class DiTAdapter(nn.Module):
    """Where DiT's blocks, branches, gates and tokens are."""

    family = FAMILY
    cfg_multiplier = 2  # classifier-free guidance doubles the batch
    # the reference's N, K, gamma, O, W; the update rule the quality table chose (README, "Update rules"):
    # the forecast's error for this step only, a quarter of it, the guidance rows paired
    default_run = ClusCaConfig(interval=5, clusters=16, propagation=0.005, order=2, warmup=2, update="step",
                               correction=0.25, pair=True)

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model.eval()
        self.cfg = model.cfg

    def sampling_info(self) -> dict:
        """What sampling needs of this model (recorded in the manifest; the runtime reads only that)."""
        cfg = self.cfg
        return {"num_classes": cfg.num_classes, "latent_shape": [cfg.in_channels, cfg.input_size, cfg.input_size]}

    def export_spec(self, options: BuildOptions) -> ExportSpec:
        cfg, B = self.cfg, options.batch * self.cfg_multiplier
        T, D, L = cfg.tokens, cfg.hidden_size, cfg.depth
        return make_spec(
            FAMILY,
            options,
            [TensorSpec("x", (B, cfg.in_channels, cfg.input_size, cfg.input_size))],
            [CacheSlot("attn", L, T, D), CacheSlot("mlp", L, T, D, fresh_group="img")],
            [TokenGroup("img", T, D, options.clusters)],
            B,
            (B, cfg.out_channels, cfg.input_size, cfg.input_size),
            cond_inputs=[TensorSpec("t", (B,)), TensorSpec("y", (B,), "int64")],
            cond_tensors=[TensorSpec("mod", (B, L, 6 * D)), TensorSpec("mod_final", (B, 2 * D))],
        )

    def conditioning(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adaLN modulation of every block and of the final layer, from the timestep and label
        alone: ``mod`` [rows, L, 6D] (shift, scale, gate of attention, then of the MLP), ``mod_final``
        [rows, 2D]."""
        m = self.model
        c = m.t_embedder(inputs["t"]) + m.y_embedder(inputs["y"])
        mod = torch.stack([blk.adaLN_modulation(c) for blk in m.blocks], dim=1)
        return {"mod": mod, "mod_final": m.final_layer.adaLN_modulation(c)}

    def forward_step(self, ctx, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        h = m.x_embedder(inputs["x"]) + m.pos_embed
        mod = inputs["mod"]
        for i, blk in enumerate(m.blocks):
            s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = mod[:, i].chunk(6, dim=1)
            a = ctx.branch("attn", i, lambda: blk.attn_branch(h, s_msa, c_msa))
            h = h + g_msa.unsqueeze(1) * a
            f = ctx.fresh_branch("mlp", i, h, lambda rows: blk.mlp_branch(rows, s_mlp, c_mlp))
            h = h + g_mlp.unsqueeze(1) * f
        ctx.hidden("img", h)
        shift, scale = inputs["mod_final"].chunk(2, dim=1)
        fl = m.final_layer
        return m.unpatchify(fl.linear(modulate(fl.norm_final(h), shift, scale)))


def probe_adapter(cfg: DiTConfig, depth: int) -> DiTAdapter:
    """``cfg`` with ``depth`` blocks (for ``analysis.flops``, which counts two depths and scales)."""
    return DiTAdapter(DiT(dataclasses.replace(cfg, depth=depth)))


# --------------------------------------------------------------------------------------------
# loading


def model_names() -> list[str]:
    return ["dit", *NAMED_CONFIGS]


def load(name: str, checkpoint=None, random_init: bool = False, seed: int = 0, **options):
    """The family entry point (see ``clusca_trt.models``): a ``LoadedModel`` for ``name``."""
    from . import LoadedModel

    if options:
        raise ConfigError(f"DiT takes no build options beyond the config, got {', '.join(sorted(options))}")
    builtin = checkpoint is None and not random_init and name in BUILTIN_WEIGHTS
    if checkpoint is None and not random_init and not builtin:
        raise ConfigError(f"model {name} needs a checkpoint (or random_init for tests), got neither")
    decoder = {"kind": "pixels"} if name in PIXEL_MODELS else None
    if builtin:
        # the shipped weights go through the same loader as a user's checkpoint file
        path = DATA_DIR / BUILTIN_WEIGHTS[name]
        if not path.is_file():
            raise CheckpointError(f"built-in weights of {name} not found: expected a file at {path}")
        model = load_original(path, NAMED_CONFIGS[name])
        source = {"kind": "builtin", "path": str(path), "sha256": tree_sha256(path)}
    elif random_init:
        if name == "dit":
            raise ConfigError("random_init needs a named config (dit-xl-2, dit-b-2, ...), got 'dit'")
        cfg = NAMED_CONFIGS[name]
        log.warning("model %s has RANDOM weights (random_init, seed %d): not for real use", name, seed)
        model = init_random(DiT(cfg), seed)
        source = {"kind": "random-init", "seed": seed}
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: expected a file or folder at {path}")
        expect = NAMED_CONFIGS.get(name)
        if path.is_dir():
            model = load_diffusers(path, expect)
            kind = "diffusers"
            vae = path / "vae"
            if (vae / "config.json").is_file():
                decoder = {"kind": "vae", "path": str(vae.resolve())}
        else:
            if expect is None:
                raise ConfigError(
                    "an original DiT checkpoint file needs a named config (--model dit-xl-2, ...), got 'dit'"
                )
            model = load_original(path, expect)
            kind = "original"
        log.info("hashing checkpoint %s", path)
        source = {"kind": kind, "path": str(path.resolve()), "sha256": tree_sha256(path)}
    return LoadedModel(name, FAMILY, DiTAdapter(model), model.cfg.to_dict(), source, decoder=decoder)


def _check_state_dict(model: DiT, sd: dict, what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise CheckpointError(
            f"{what} does not match the config: {len(missing)} missing and {len(unexpected)} "
            f"unexpected tensors (first: {first})"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{what} does not match the config: expected {k} of shape {list(v.shape)}, "
                f"got {list(sd[k].shape)}"
            )


def load_original(path: Path, cfg: DiTConfig) -> DiT:
    """An original DiT checkpoint (``DiT-XL-2-256x256.pt``: a state dict, or a training
    checkpoint holding one under ``ema`` or ``model``), or the same state dict as ``.safetensors``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise CheckpointError(f"cannot read DiT checkpoint {path}: {describe(e)}") from e
    if isinstance(sd, dict) and "ema" in sd:
        sd = sd["ema"]
    elif isinstance(sd, dict) and "model" in sd:
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"expected a state dict in {path}, got {type(sd).__name__}")
    sd = check_state_dict(sd, f"checkpoint {path.name}")  # tensors only, floating point, as float32
    model = DiT(cfg)
    _check_state_dict(model, sd, f"checkpoint {path.name}")
    model.load_state_dict(sd)
    return model.eval()


def _diffusers_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise CheckpointError(
        f"expected a diffusers DiTTransformer2DModel folder (config.json) or a DiTPipeline folder "
        f"(transformer/config.json) at {path}, got neither"
    )


def diffusers_config(path: Path) -> DiTConfig:
    folder = _diffusers_dir(path)
    raw = read_config(folder / "config.json", "DiT config")
    if raw.get("_class_name") not in (None, TRANSFORMER_CLASS, "Transformer2DModel"):
        raise CheckpointError(f"expected a DiTTransformer2DModel config in {folder}, got {raw.get('_class_name')}")
    return config_from_diffusers(raw, f"DiT config {folder / 'config.json'}", str(folder))


def config_from_diffusers(raw: dict, where: str, folder: str) -> DiTConfig:
    """Our config of a diffusers ``DiTTransformer2DModel`` config (``where``, ``folder``: for messages)."""

    def field(name, default, kind=int):
        return config_value(raw, name, kind, default, where, low=1 if kind is int else 0)

    heads = field("num_attention_heads", 16)
    in_ch = field("in_channels", 4)
    out_ch = field("out_channels", None) or in_ch
    try:
        return DiTConfig(
            input_size=field("sample_size", 32),
            patch_size=field("patch_size", 2),
            in_channels=in_ch,
            hidden_size=heads * field("attention_head_dim", 72),
            depth=field("num_layers", 28),
            num_heads=heads,
            num_classes=field("num_embeds_ada_norm", 1000),
            learn_sigma=out_ch == 2 * in_ch,
            time_freq_shift=1,
            mlp_norm_eps=field("norm_eps", 1e-5, float),
        )
    except ConfigError as e:
        raise CheckpointError(f"unsupported DiT config in {folder}: {e}") from e


def _from_diffusers_state_dict(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {
        "t_embedder.mlp.0": "timestep_embedder.linear_1",
        "t_embedder.mlp.2": "timestep_embedder.linear_2",
        "y_embedder.embedding_table": "class_embedder.embedding_table",
    }
    for ours, theirs in shared.items():
        for suffix in (".weight", ".bias"):
            key = emb.format(0) + theirs + suffix
            if key not in sd:
                continue
            for i in range(1, cfg.depth):
                if not torch.equal(sd[emb.format(i) + theirs + suffix], sd[key]):
                    raise CheckpointError(
                        f"expected every block to share the conditioning embedding (as converted DiT "
                        f"checkpoints do), got a different {theirs} in block {i}"
                    )
            out[ours + suffix] = sd[key]
    for i in range(cfg.depth):
        p = f"transformer_blocks.{i}."
        q = f"blocks.{i}."
        for suffix in (".weight", ".bias"):
            out[q + "attn.qkv" + suffix] = torch.cat(
                [sd[p + f"attn1.to_{n}" + suffix] for n in ("q", "k", "v")], dim=0
            )
            out[q + "attn.proj" + suffix] = sd[p + "attn1.to_out.0" + suffix]
            out[q + "mlp.fc1" + suffix] = sd[p + "ff.net.0.proj" + suffix]
            out[q + "mlp.fc2" + suffix] = sd[p + "ff.net.2" + suffix]
            out[q + "adaLN_modulation.1" + suffix] = sd[p + "norm1.linear" + suffix]
    return out


def load_diffusers(path: Path, expect: DiTConfig | None = None) -> DiT:
    """A diffusers ``DiTTransformer2DModel`` folder, or a ``DiTPipeline`` folder with ``transformer/``."""
    from diffusers import DiTTransformer2DModel

    cfg = diffusers_config(path)
    if expect is not None:
        for f in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(cfg, f) != getattr(expect, f):
                raise CheckpointError(
                    f"checkpoint {path} does not match the config: expected {f}={getattr(expect, f)}, "
                    f"got {getattr(cfg, f)}"
                )
    check_safetensors_dtypes(_diffusers_dir(path), f"cannot load diffusers DiT from {path}")
    try:
        theirs = DiTTransformer2DModel.from_pretrained(str(_diffusers_dir(path)), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load diffusers DiT from {path}: {describe(e)}") from e
    try:
        sd = _from_diffusers_state_dict(theirs.state_dict(), cfg)
    except KeyError as e:
        raise CheckpointError(f"diffusers DiT in {path} lacks tensor {e.args[0]}") from e
    model = DiT(cfg)
    sd["pos_embed"] = model.pos_embed.detach().clone()
    _check_state_dict(model, sd, f"checkpoint {path}")
    model.load_state_dict(sd)
    return model.eval()


def from_diffusers_module(transformer: nn.Module) -> DiT:
    """Our DiT over a live diffusers ``DiTTransformer2DModel``'s weights: every tensor it does not
    concatenate (attention q, k, v -> qkv) is shared with ``transformer``, on its device and in its dtype."""
    cfg = config_from_diffusers(dict(transformer.config), "the DiT transformer's config", "the pipeline's transformer")
    try:
        sd = _from_diffusers_state_dict(transformer.state_dict(), cfg)
    except KeyError as e:
        raise CheckpointError(f"the pipeline's DiT transformer lacks tensor {e.args[0]}") from e
    with torch.device("meta"):
        model = DiT(cfg)  # no weights allocated: every one comes from ``sd``
    pos = torch.from_numpy(sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)).unsqueeze(0)
    sd["pos_embed"] = pos.to(sd["x_embedder.proj.weight"].device)
    _check_state_dict(model, sd, "the pipeline's DiT transformer")
    model.load_state_dict(sd, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# inside a diffusers DiTPipeline (``clusca_trt.diffusers``)


def pipeline_call(transformer: nn.Module, args: dict, pipe=None):
    """A ``DiTTransformer2DModel`` forward call (``hidden_states``, ``timestep``, ``class_labels``) as our
    ``x``, ``t``, ``y``; guided where the second half of the rows has the null class (as DiTPipeline
    batches classifier-free guidance). Another latent size than the transformer's ``sample_size``
    (diffusers would interpolate its position embedding) is not modelled."""
    reason = unmodelled(args, ("cross_attention_kwargs",))
    if reason:
        return reason
    x, labels = args.get("hidden_states"), args.get("class_labels")
    side = transformer.config.sample_size
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[2:]) != (side, side):
        got = list(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__
        return f"latents of shape {got}, not the transformer's sample size {side} x {side}"
    rows = x.shape[0]
    t = timestep_vector(args.get("timestep"), rows)
    if t is None or not isinstance(labels, torch.Tensor) or labels.numel() != rows:
        return "a call without one timestep and one class label per row"
    y = labels.reshape(-1)
    null, half, values = transformer.config.num_embeds_ada_norm, rows // 2, y.tolist()  # a few ints: the host's
    guided = rows % 2 == 0 and all(v == null for v in values[half:]) and all(v < null for v in values[:half])
    return TransformerCall(rows, {}, {"x": x}, {"t": t, "y": y}, "t", like=x, guided=guided)


def pipeline_adapter(transformer: nn.Module, shape: dict, pipe=None) -> DiTAdapter:
    """The adapter over the pipeline's transformer (``shape``: DiT has no build options)."""
    return DiTAdapter(from_diffusers_module(transformer))


def pipeline_timesteps(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """DiTPipeline feeds the scheduler's timestep as it is (expanded to the rows)."""
    return timesteps.to(like.dtype)


PIPELINE = PipelineBinding(TRANSFORMER_CLASS, DiTAdapter, pipeline_call, pipeline_adapter, pipeline_timesteps)
