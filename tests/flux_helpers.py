"""A tiny FLUX pipeline folder built by the tests: random weights, a few blocks, tiny T5 and CLIP
text encoders with word-level tokenizers made from a small vocabulary (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch

from clusca_trt.models import flux

WORDS = "a an the of oil painting couple under umbrella cat dog red blue sky sea on in with".split()
TINY = flux.NAMED_CONFIGS["flux-tiny"]  # 128 x 128 px: 8 x 8 latent patches = 64 image tokens, 16 text tokens


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Small random weights everywhere (a fresh model's zero-initialised layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4.0))


def tiny_transformer(cfg: flux.FluxConfig = TINY, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**cfg.transformer_config()).eval()
    _randomise(model, seed)
    return model


def _tokenizer(specials: list[str], template: str, max_length: int, **special_names):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special_names), vocab


def make_flux_folder(folder: Path, cfg: flux.FluxConfig = TINY, seed: int = 0, transformer_only: bool = False):
    """Save a FLUX pipeline (or only its transformer) to ``folder``; returns the transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = tiny_transformer(cfg, seed)
    if transformer_only:
        transformer.save_pretrained(folder)
        return transformer
    t5_tok, t5_vocab = _tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", 512,
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    clip_tok, clip_vocab = _tokenizer(["<|startoftext|>", "<|endoftext|>", "<unk>"], "<|startoftext|> $A <|endoftext|>",
                                      8, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocab), d_model=cfg.joint_attention_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=cfg.pooled_projection_dim, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=2, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    for m in (t5, clip, vae):
        _randomise(m, seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg.scheduler)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return transformer
