"""A tiny HunyuanVideo pipeline folder built by the tests: random weights, two dual-stream and two
single-stream blocks, 9 frames at 64 x 64 (3 latent frames, 48 video tokens), 16 text tokens; tiny
Llama and CLIP text encoders with word-level tokenizers (no hub access), a tiny causal 3D VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from clusca_trt.models import hunyuan_video as hv
from tests.flux_helpers import WORDS, _randomise, _tokenizer, tiny_clip

TINY = hv.NAMED_CONFIGS["hunyuan-video-tiny"]


def tiny_transformer(cfg: hv.HunyuanVideoConfig = TINY, seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(**cfg.transformer_config()).eval()
    _randomise(model, seed)
    return model


def tiny_vae(cfg: hv.HunyuanVideoConfig = TINY, seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(
        latent_channels=cfg.in_channels, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2,
        mid_block_add_attention=False,
    ).eval()
    _randomise(vae, seed)
    return vae


def make_hunyuan_folder(folder: Path, cfg: hv.HunyuanVideoConfig = TINY, seed: int = 0, transformer_only: bool = False):
    """Save a HunyuanVideo pipeline (or only its transformer) to ``folder``; returns the transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    transformer = tiny_transformer(cfg, seed)
    if transformer_only:
        transformer.save_pretrained(folder)
        return transformer
    # the prompt template's words are unknown to the tiny vocabulary: every one is <unk>
    llama_tok, llama_vocab = _tokenizer(["<pad>", "<s>", "<unk>"], "<s> $A", 1024,
                                        pad_token="<pad>", bos_token="<s>", unk_token="<unk>")
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(llama_vocab), hidden_size=cfg.text_embed_dim, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
    )).eval()
    clip_tok, clip = tiny_clip(cfg.pooled_projection_dim, max_length=77, intermediate_size=16)
    for m in (llama, clip):
        _randomise(m, seed + 1)
    pipe = HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=tiny_vae(cfg, seed + 2),
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg.scheduler), text_encoder_2=clip, tokenizer_2=clip_tok,
    )
    pipe.save_pretrained(folder)
    return transformer


__all__ = ["TINY", "WORDS", "make_hunyuan_folder", "tiny_transformer", "tiny_vae"]
