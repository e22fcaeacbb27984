"""Shared fixtures: tiny DiT models built by the tests, and engine directories built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clusca_trt.models import dit, load_model
from clusca_trt.spec import BuildOptions

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Workers of pytest-xdist (``scripts/test.sh``: ``-n auto --dist loadgroup``) take whole test
    files, so a module's fixtures are built once; the serve tests all go to one worker (one Ray at a
    time). Without xdist the marks do nothing."""
    for item in items:
        path = Path(str(item.fspath)).resolve().relative_to(TESTS)
        item.add_marker(pytest.mark.xdist_group("serve" if path.parts[0] == "serve" else path.as_posix()))


if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: torch's own threads would oversubscribe them
    torch.set_num_threads(1)

TINY = dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="session")
def tiny_model():
    """dit-tiny (64 tokens) with random weights, seed 0."""
    return load_model("dit-tiny", random_init=True, seed=0)


@pytest.fixture(scope="session")
def engines_k4(tiny_model, tmp_path_factory):
    from clusca_trt.exporters.build import build_engines

    out = tmp_path_factory.mktemp("eng") / "k4"
    return build_engines(tiny_model, BuildOptions(batch=2, clusters=4, order=2), out).manifest


@pytest.fixture(scope="session")
def engines_k16(tiny_model, tmp_path_factory):
    from clusca_trt.exporters.build import build_engines

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


# -- FLUX ----------------------------------------------------------------------------------
FLUX_OPTIONS = BuildOptions(batch=2, clusters=4, text_clusters=3, order=2)  # K_img 4 of 64, K_txt 3 of 16


@pytest.fixture(scope="session")
def hv_folder(tmp_path_factory):
    """A tiny HunyuanVideo pipeline folder (transformer, Llama and CLIP text encoders, tokenizers, VAE)."""
    from tests.hunyuan_helpers import make_hunyuan_folder

    folder = tmp_path_factory.mktemp("hv") / "HunyuanVideo-tiny"
    make_hunyuan_folder(folder)
    return folder


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory):
    """A tiny FLUX.1-dev-like pipeline folder (transformer, T5, CLIP, tokenizers, VAE, scheduler)."""
    from tests.flux_helpers import make_flux_folder

    folder = tmp_path_factory.mktemp("flux") / "FLUX-tiny"
    make_flux_folder(folder)
    return folder


@pytest.fixture(scope="session")
def flux_model(flux_folder):
    return load_model("flux", checkpoint=flux_folder, height=128, width=128, text_length=16)


@pytest.fixture(scope="session")
def flux_engines(flux_model, tmp_path_factory):
    """The tiny FLUX's engines, built into ``<dir>/128x128`` of a directory of FLUX builds."""
    from clusca_trt.exporters.build import build_engines

    return build_engines(flux_model, FLUX_OPTIONS, tmp_path_factory.mktemp("flux-eng") / "flux").manifest
