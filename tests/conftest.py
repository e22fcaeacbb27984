"""Shared fixtures: tiny DiT models built by the tests, and engine directories built once per session."""

from __future__ import annotations

import pytest
import torch

from clusca_trt.models import dit, load_model
from clusca_trt.spec import BuildOptions

TINY = dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="session")
def tiny_model():
    """dit-tiny (64 tokens) with random weights, seed 0."""
    return load_model("dit-tiny", random_init=True, seed=0)


@pytest.fixture(scope="session")
def engines_k4(tiny_model, tmp_path_factory):
    from clusca_trt.engines.build import build_engines

    out = tmp_path_factory.mktemp("eng") / "k4"
    return build_engines(tiny_model, BuildOptions(batch=2, clusters=4, order=2), out).manifest


@pytest.fixture(scope="session")
def engines_k16(tiny_model, tmp_path_factory):
    from clusca_trt.engines.build import build_engines

    out = tmp_path_factory.mktemp("eng") / "k16"
    return build_engines(tiny_model, BuildOptions(batch=1, clusters=16, order=2), out).manifest


def make_diffusers_dit(folder, seed: int = 0):
    """A tiny diffusers DiTTransformer2DModel with random weights, saved to ``folder``.

    The per-block conditioning embeddings are tied, as in every converted DiT checkpoint."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4.0))
        first = m.transformer_blocks[0].norm1.emb
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(first.state_dict())
    m.save_pretrained(folder)
    return m.eval()
