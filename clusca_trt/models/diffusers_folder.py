"""What the diffusers transformer families (FLUX, HunyuanVideo) share: loading a diffusers
checkpoint folder (a pipeline folder or just its ``transformer/``) or random weights into a
``LoadedModel``, and the adapters' MMDiT pieces (modulation, the dual-stream and the
single-stream block written against a step context).

A family describes itself with a ``DiffusersFamily`` (its name in messages, its diffusers
transformer class, its build options, its decoder kind) and passes its own config readers to
``load``; every error message names the family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, describe, one_line
from ..hashing import tree_sha256
from ..spec import BuildOptions, CacheSlot, ExportSpec, TensorSpec, TokenGroup, make_spec
from .checks import check_safetensors_dtypes, config_value, read_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffusersFamily:
    """A diffusers transformer family, as the loader and its messages need it."""

    family: str  # the family id (``FAMILY``)
    label: str  # its name in messages: "FLUX", "HunyuanVideo"
    transformer_class: str  # diffusers' transformer class, e.g. "FluxTransformer2DModel"
    build_options: tuple[str, ...]
    decoder_kind: str  # ``LoadedModel.decoder["kind"]`` where the pipeline folder has a VAE

    def transformer_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class)


# --------------------------------------------------------------------------------------------
# loading


def load(
    fam: DiffusersFamily,
    name: str,
    checkpoint,
    random_init: bool,
    seed: int,
    options: dict,
    *,
    named_config: Callable[[str], object],
    folder_config: Callable[[Path, Path | None], object],
    adapter: Callable[[nn.Module, object], nn.Module],
    build_name: Callable[[object], str],
):
    """The body of a family's ``load``: a ``LoadedModel`` from random weights under ``seed`` (config
    ``named_config(name)``) or from a diffusers folder (config ``folder_config(transformer folder,
    pipeline folder or None)``), either with the build ``options`` applied."""
    from . import LoadedModel

    unknown = sorted(set(options) - set(fam.build_options))
    if unknown:
        raise ConfigError(f"{fam.label} build options are {', '.join(fam.build_options)}, got {', '.join(unknown)}")
    if checkpoint is None and not random_init:
        raise ConfigError(f"model {name} needs a checkpoint folder (or random_init for tests), got neither")
    decoder = None
    if random_init:
        cfg = with_options(named_config(name), options)
        log.warning("model %s has RANDOM weights (random_init, seed %d): not for real use", name, seed)
        model = init_random(fam, cfg.transformer_config(), seed)
        source = {"kind": "random-init", "seed": seed}
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: expected a {fam.label} folder at {path}")
        folder = transformer_dir(fam, path)
        root = pipeline_dir(path)
        cfg = with_options(folder_config(folder, root), options)
        model = load_transformer(fam, folder)
        if root is not None and (root / "vae" / "config.json").is_file():
            decoder = {"kind": fam.decoder_kind, "path": str((root / "vae").resolve())}
        log.info("hashing checkpoint %s", folder)
        source = {"kind": "diffusers", "path": str(path.resolve()), "sha256": tree_sha256(folder)}
        if root is not None:  # where the runtime finds the text encoders
            source["pipeline"] = str(root.resolve())
    chosen = {k: getattr(cfg, k) for k in fam.build_options}
    return LoadedModel(
        name, fam.family, adapter(model, cfg), cfg.to_dict(), source, options=chosen, decoder=decoder,
        build_name=build_name(cfg),
    )


def with_options(cfg, options: dict):
    return cfg.replace(**options) if options else cfg


def init_random(fam: DiffusersFamily, transformer_config: dict, seed: int) -> nn.Module:
    """diffusers' own initialisation under ``seed`` (the global RNG is left as it was)."""
    cls = fam.transformer_cls()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**transformer_config).eval()


def transformer_dir(fam: DiffusersFamily, path: Path) -> Path:
    """The family's transformer folder: ``path`` itself or ``path/transformer``."""
    for folder in (path, path / "transformer"):
        config = folder / "config.json"
        if config.is_file():
            cls = read_config(config, f"{fam.label} config").get("_class_name")
            if cls != fam.transformer_class:
                raise CheckpointError(f"expected a {fam.transformer_class} config in {folder}, got {cls}")
            return folder
    raise CheckpointError(
        f"expected a {fam.label} pipeline folder (transformer/config.json) or a {fam.transformer_class} folder "
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


def architecture(folder: Path, defaults, names: tuple[str, ...]) -> tuple[dict, dict]:
    """(the folder's raw ``config.json``, its architecture fields ``names``), unset ones from
    ``defaults``; an unset or null ``out_channels`` is ``in_channels``."""
    path = folder / "config.json"
    raw = read_config(path, "transformer config")
    return raw, architecture_from(raw, defaults, names, f"config {path}")


def architecture_from(raw: dict, defaults, names: tuple[str, ...], where: str) -> dict:
    """The architecture fields ``names`` of a transformer config ``raw`` (a folder's or a live
    model's), unset ones from ``defaults``; an unset or null ``out_channels`` is ``in_channels``."""
    arch = {}
    for n in names:
        if n == "out_channels" and raw.get(n) is None:  # diffusers writes null for "as in_channels" (FLUX.1-dev)
            arch[n] = None
            continue
        default = getattr(defaults, n)
        kind = bool if isinstance(default, bool) else int if isinstance(default, int) else \
            float if isinstance(default, float) else "ints" if isinstance(default, tuple) else type(default)
        if kind == "ints" and isinstance(raw.get(n), tuple):  # a live model's config keeps tuples
            raw = dict(raw, **{n: list(raw[n])})
        value = config_value(raw, n, kind, default, where, low=0 if kind in (int, float) else None)
        arch[n] = tuple(value) if kind == "ints" else value
    arch["out_channels"] = arch["out_channels"] or arch["in_channels"]
    return arch


def pipeline_configs(root: Path | None) -> tuple[dict | None, dict | None]:
    """(the scheduler's config without diffusers' ``_`` keys, the VAE's config) of a pipeline
    folder; None where the folder or the file is absent."""
    if root is None:
        return None, None
    sched = root / "scheduler" / "scheduler_config.json"
    vae = root / "vae" / "config.json"
    scheduler = None
    if sched.is_file():
        scheduler = {k: v for k, v in read_config(sched, "scheduler config").items() if not k.startswith("_")}
    return scheduler, read_config(vae, "VAE config") if vae.is_file() else None


def checked_config(fam: DiffusersFamily, folder: Path, base, **changes):
    """``base`` with a folder's ``changes``; a config the family refuses is a checkpoint error."""
    try:
        return base.replace(**changes)
    except ConfigError as e:
        raise CheckpointError(f"unsupported {fam.label} config in {folder}: {e}") from e
    except (TypeError, ValueError) as e:  # a value of the wrong type in a folder's config
        raise CheckpointError(f"unsupported {fam.label} config in {folder}: {describe(e)}") from e


def load_transformer(fam: DiffusersFamily, folder: Path) -> nn.Module:
    cls = fam.transformer_cls()
    check_safetensors_dtypes(folder, f"cannot load {fam.label} transformer from {folder}")
    try:  # a local folder only: never the network
        return cls.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as e:  # diffusers raises many types for a bad folder
        message = f"cannot load {fam.label} transformer from {folder}: {type(e).__name__}: {e}"
        raise CheckpointError(one_line(message)) from e


# --------------------------------------------------------------------------------------------
# MMDiT pieces of the adapters


def export_spec(
    family: str, cfg, options: BuildOptions, batch: int, inputs: list[TensorSpec], image_tokens: int,
    output_shape: tuple[int, ...], cond_inputs: list[TensorSpec], extra_cond: list[TensorSpec] = (),
) -> ExportSpec:
    """The graphs of a dual-/single-stream build: the model ``inputs`` (the latents); the
    conditioning computed ahead from ``cond_inputs`` (then ``guidance`` where ``cfg.guidance_embeds``):
    every block's modulation (``mod_double`` [B, L2, 12D]: image then text stream; ``mod_single``
    [B, L1, 3D]; ``mod_out`` [B, 2D]), the embedded text ``context`` [B, T_txt, D] and the family's
    ``extra_cond``; both streams' attention and MLP caches per dual-stream block, the joint output
    cache per single-stream block, and the ``img`` and ``txt`` token groups."""
    B, T_img, T_txt, D = batch, image_tokens, cfg.text_length, cfg.hidden_size
    if cfg.guidance_embeds:
        cond_inputs = [*cond_inputs, TensorSpec("guidance", (B,))]
    L2, L1 = cfg.num_layers, cfg.num_single_layers
    slots = [
        CacheSlot("attn_img", L2, T_img, D),
        CacheSlot("attn_txt", L2, T_txt, D),
        CacheSlot("mlp_img", L2, T_img, D, fresh_group="img"),
        CacheSlot("mlp_txt", L2, T_txt, D, fresh_group="txt"),
    ]
    cond = [TensorSpec("mod_double", (B, L2, 12 * D))]
    if L1:
        slots.append(CacheSlot("single", L1, T_img + T_txt, D))
        cond.append(TensorSpec("mod_single", (B, L1, 3 * D)))
    cond += [TensorSpec("mod_out", (B, 2 * D)), TensorSpec("context", (B, T_txt, D)), *extra_cond]
    # unset: K of the image tokens, at most every text token (HunyuanVideo's K=32 of a 16-token tiny text)
    k_txt = min(options.clusters, T_txt) if options.text_clusters is None else options.text_clusters
    groups = [TokenGroup("img", T_img, D, options.clusters), TokenGroup("txt", T_txt, D, k_txt)]
    return make_spec(family, options, inputs, slots, groups, B, output_shape, cond_inputs=cond_inputs,
                     cond_tensors=cond)


def block_modulations(model: nn.Module, temb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block's ``AdaLayerNormZero[Single]`` and the final ``AdaLayerNormContinuous``
    projections of ``temb`` (the conditioning tables ``mod_double``, ``mod_single``, ``mod_out``)."""
    def project(norm):
        return norm.linear(norm.silu(temb))

    out = {"mod_double": torch.stack(
        [torch.cat([project(b.norm1), project(b.norm1_context)], dim=1) for b in model.transformer_blocks], dim=1)}
    if len(model.single_transformer_blocks):
        out["mod_single"] = torch.stack([project(b.norm) for b in model.single_transformer_blocks], dim=1)
    out["mod_out"] = project(model.norm_out)
    return out


def final_norm(model: nn.Module, x: torch.Tensor, mod_out: torch.Tensor) -> torch.Tensor:
    """diffusers' ``AdaLayerNormContinuous`` with its projection ``mod_out`` [B, 2D] computed ahead."""
    scale, shift = mod_out.chunk(2, dim=1)
    return model.norm_out.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


def modulate(x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def double_block(ctx, i: int, blk: nn.Module, x, c, mod: torch.Tensor, **attention_kwargs):
    """Dual-stream block ``i`` (diffusers' FLUX and HunyuanVideo blocks alike): the joint attention
    ``ctx.branches(("attn_img", "attn_txt"), ...)``, then each stream's MLP on its fresh rows,
    ``ctx.fresh_branch("mlp_img" | "mlp_txt", ...)``. ``mod`` [B, 12D]: the block's modulation of
    the image then the text stream (``block_modulations``). ``attention_kwargs``: the rotary
    embedding and any mask, passed to the block's attention."""
    s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp, ts_msa, tc_msa, tg_msa, ts_mlp, tc_mlp, tg_mlp = mod.chunk(12, dim=1)

    def joint_attention():
        return blk.attn(
            hidden_states=modulate(x, blk.norm1.norm, s_msa, c_msa),
            encoder_hidden_states=modulate(c, blk.norm1_context.norm, ts_msa, tc_msa),
            **attention_kwargs,
        )

    a_img, a_txt = ctx.branches(("attn_img", "attn_txt"), i, joint_attention)
    x = x + g_msa.unsqueeze(1) * a_img
    f = ctx.fresh_branch("mlp_img", i, x, lambda rows: blk.ff(modulate(rows, blk.norm2, s_mlp, c_mlp)))
    x = x + g_mlp.unsqueeze(1) * f
    c = c + tg_msa.unsqueeze(1) * a_txt
    f = ctx.fresh_branch(
        "mlp_txt", i, c, lambda rows: blk.ff_context(modulate(rows, blk.norm2_context, ts_mlp, tc_mlp))
    )
    c = c + tg_mlp.unsqueeze(1) * f
    return x, c


def single_block(ctx, j: int, blk: nn.Module, h, mod: torch.Tensor,
                 attention: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    """Single-stream block ``j``: the joint output projection ``proj_out(cat(attn, mlp))`` is
    ``ctx.branch("single", j, ...)``; ``attention(blk, normed tokens)`` is the block's attention;
    ``mod`` [B, 3D] its modulation."""
    shift, scale, gate = mod.chunk(3, dim=1)

    def joint_output():
        n = modulate(h, blk.norm.norm, shift, scale)
        mlp = blk.act_mlp(blk.proj_mlp(n))
        return blk.proj_out(torch.cat([attention(blk, n), mlp], dim=2))

    return h + gate.unsqueeze(1) * ctx.branch("single", j, joint_output)
