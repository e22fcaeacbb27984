"""Tiny diffusers pipelines the ``clusca_trt.enable`` tests build: a random-weight DiT in a
``DiTPipeline`` (DDIM configured as DiT samples, so ``Pipeline.generate`` is its twin), and
helpers that run a pipeline and catch what its VAE would decode."""

from __future__ import annotations

from pathlib import Path

import torch

DIT_SIDE = 8  # latent side: 4 x 4 patches = 16 tokens
NULL = 1000  # DiTPipeline's null class is 1000 whatever the model: the tiny DiT has 1000 classes


def dit_scheduler():
    """diffusers' DDIM as DiT's own DDIM samples (linear betas, no clipping, final alpha 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


def tiny_dit(seed: int = 0):
    """A random-weight ``DiTTransformer2DModel`` (2 blocks, 32 wide), conditioning embeddings tied
    across blocks as in every converted DiT checkpoint."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                              sample_size=DIT_SIDE, patch_size=2, num_embeds_ada_norm=NULL)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 4.0))
        first = m.transformer_blocks[0].norm1.emb
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(first.state_dict())
    return m.eval()


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=2).eval()


def dit_pipeline(seed: int = 0, folder: Path | None = None):
    """A ``DiTPipeline`` over ``tiny_dit(seed)``; with ``folder``: saved there and loaded back (so its
    transformer knows the folder it came from, as a user's does)."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit(seed), vae=tiny_vae(), scheduler=dit_scheduler())
    if folder is not None:
        pipe.save_pretrained(folder)
        pipe = DiTPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Latents:
    """Catches the latents a pipeline hands its VAE (``pipe.vae.decode``'s input, unscaled back)."""

    def __init__(self, pipe):
        self.pipe, self.got = pipe, []
        self.decode = pipe.vae.decode
        pipe.vae.decode = self

    def __call__(self, z, *args, **kwargs):
        self.got.append((z * self.pipe.vae.config.scaling_factor).clone())
        return self.decode(z, *args, **kwargs)

    def close(self):
        del self.pipe.vae.decode


def dit_latents(pipe, labels, seed: int = 0, steps: int = 10, **kw) -> torch.Tensor:
    """The final latents of a DiTPipeline call (what its VAE decodes)."""
    spy = Latents(pipe)
    try:
        pipe(class_labels=labels, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
             output_type="np", **kw)
    finally:
        spy.close()
    return spy.got[-1]
