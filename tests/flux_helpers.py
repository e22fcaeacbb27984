"""A tiny FLUX pipeline folder built by the tests: random weights, a few blocks, tiny T5 and CLIP
text encoders with word-level tokenizers made from a small vocabulary (no hub access). Also what
the HunyuanVideo tests share with FLUX's: random weights, tokenizers, a tiny CLIP and ``PartialStep``."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from clusca_trt.config import UpdateRule
from clusca_trt.models import flux
from tests.step_helpers import per_block, step_tables

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


def tiny_clip(hidden_size: int, max_length: int, intermediate_size: int):
    """A one-layer CLIP text encoder (default init: randomise it) and its word-level tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab = _tokenizer(["<|startoftext|>", "<|endoftext|>", "<unk>"], "<|startoftext|> $A <|endoftext|>",
                            max_length, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<unk>")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    return tok, clip


def make_flux_folder(folder: Path, cfg: flux.FluxConfig = TINY, seed: int = 0, transformer_only: bool = False):
    """Save a FLUX pipeline (or only its transformer) to ``folder``; returns the transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    transformer = tiny_transformer(cfg, seed)
    if transformer_only:
        transformer.save_pretrained(folder)
        return transformer
    t5_tok, t5_vocab = _tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", 512,
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocab), d_model=cfg.joint_attention_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    clip_tok, clip = tiny_clip(cfg.pooled_projection_dim, max_length=8, intermediate_size=32)
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


class PartialStep:
    """A partial step's random state and its literal reading, for a model with dual-stream blocks
    and ``img`` and ``txt`` token groups: cluster assignments, fresh rows (a uniformly random
    member of every cluster, anew per block), caches and Taylor coefficients for ``order`` at
    distance ``d``; ``forecast`` and ``mlp_stream`` read the cached branches, ``new`` collects the
    MLP caches the step should write."""

    def __init__(self, spec, tokens: dict, k: dict, gamma: dict, order: int, d: int, blocks: int = 2, seed: int = 0):
        self.spec = spec
        gen = torch.Generator().manual_seed(seed)
        self.tokens, self.gamma, self.d = tokens, gamma, d
        self.assign = {g: (torch.randperm(T, generator=gen) % k[g]).unsqueeze(0) for g, T in tokens.items()}
        self.fresh = {}
        for g in tokens:
            members = [torch.nonzero(self.assign[g][0] == c)[:, 0] for c in range(k[g])]
            pick = [[[int(m[torch.randint(len(m), (1,), generator=gen)]) for m in members]] for _ in range(blocks)]
            self.fresh[g] = torch.tensor(pick)
        self.caches = {}
        for s in spec.slots:
            self.caches[f"{s.name}_f0"] = torch.randn(s.layers, 1, s.tokens, s.dim, generator=gen)
            self.caches[f"{s.name}_fhi"] = torch.randn(s.layers, order, 1, s.tokens, s.dim, generator=gen)
        self.coef = torch.tensor([d**i / math.factorial(i) for i in range(order + 1)])
        self.new = {g: self.caches[f"mlp_{g}_f0"].clone() for g in ("img", "txt")}

    def feeds(self, inputs: dict, adapter) -> dict:
        gamma = torch.tensor([self.gamma["img"], self.gamma["txt"]])
        feeds = {**inputs, **step_tables(adapter, self.spec, inputs), **per_block(self.caches), "forecast_coef": self.coef,
                 "gamma": gamma, "update": torch.tensor([UpdateRule.PAPER.fields()] * self.spec.update_blocks)}
        for g in self.tokens:
            feeds[f"assign_{g}"], feeds[f"fresh_{g}"] = self.assign[g], self.fresh[g]
        return feeds

    def forecast(self, slot: str, layer: int, f0=None):
        f0 = self.caches[f"{slot}_f0"][layer] if f0 is None else f0
        return f0 + self.caches[f"{slot}_fhi"][layer, 0] * self.d

    def mlp_stream(self, i, g, h, ff, norm, shift, scale):
        """Block ``i``'s MLP of group ``g``: fresh rows computed, the others propagated with gamma."""
        gamma, cache = self.gamma[g], self.caches[f"mlp_{g}_f0"]
        for n in range(self.tokens[g]):
            j = int(self.fresh[g][i, 0, self.assign[g][0, n]])
            f = ff(norm(h[:, j : j + 1]) * (1 + scale[:, None]) + shift[:, None])[0, 0]
            self.new[g][i, 0, n] = f if n == j else gamma * f + (1 - gamma) * cache[i, 0, n]
        return self.forecast(f"mlp_{g}", i, self.new[g][i])
