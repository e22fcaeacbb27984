"""FLUX text-to-image sampling over any denoiser: the ClusCa engines (``ScheduledDenoiser``) or a
plain model call (the test oracle).

* Sampler: diffusers' ``FlowMatchEulerDiscreteScheduler`` (config from the checkpoint folder,
  recorded at build time) with the FLUX pipeline's sigmas and its resolution-dependent shift
  (``calculate_shift``: mu grows linearly with the image token count); 50 steps (dev) or 4
  (schnell) by default; distilled guidance 3.5 fed to the model (dev only, no second pass).
* Latents: drawn, packed (2 x 2 patches -> tokens) and unpacked as diffusers' ``FluxPipeline``
  does, from one ``torch.Generator`` seeded with ``seed``: a seed gives diffusers' initial noise.
* Prompts: T5 + CLIP in PyTorch through diffusers' ``FluxPipeline.encode_prompt``, loaded from
  the checkpoint folder the engines were built from (or ``encoders=``). Precomputed
  ``prompt_embeds`` [n, text_length, T5 dim] and ``pooled_prompt_embeds`` [n, CLIP dim] skip it.
* ClusCa: the image tokens propagate with gamma; the text tokens only scatter their fresh rows
  (gamma 0, as the reference), unless ``text_propagation`` is set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..families import FLUX
from .diffusers_common import FlowMatchingRuntime, quiet_loading

class FluxRuntime(FlowMatchingRuntime):
    family = FLUX
    pipeline_module = "diffusers.pipelines.flux.pipeline_flux"
    pipeline_class = "FluxPipeline"

    def noise_shape(self, cfg) -> tuple[int, ...]:
        return (cfg.latent_channels, *cfg.latent_size)

    def pack(self, noise: torch.Tensor, cfg) -> np.ndarray:
        """Packed initial noise [n, image tokens, in_channels], as ``FluxPipeline.prepare_latents`` packs it."""
        lh, lw = cfg.latent_size
        return self.module().FluxPipeline._pack_latents(noise, noise.shape[0], cfg.latent_channels, lh, lw).numpy()

    def finish(self, latents: np.ndarray, cfg) -> np.ndarray:
        """[n, tokens, C*4] -> the VAE latent [n, C, H/8, W/8]."""
        fp = self.module().FluxPipeline
        return fp._unpack_latents(torch.from_numpy(latents), cfg.height, cfg.width, cfg.vae_scale_factor).numpy()

    def sigmas(self, cfg, steps: int):
        """The FLUX pipeline's sigmas and its shift ``mu`` for the image token count."""
        c = cfg.scheduler
        mu = self.module().calculate_shift(
            cfg.image_tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        sigmas = None if c.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        return sigmas, {"mu": mu}

    def feeds(self, cfg, x, t, embeds, guidance):
        B = x.shape[0]
        f = {
            "hidden_states": x.numpy(),
            "encoder_hidden_states": embeds[0],
            "pooled_projections": embeds[1],
            "timestep": (t.expand(B).to(torch.float32) / 1000).numpy(),
        }
        if cfg.guidance_embeds:
            f["guidance"] = np.full((B,), guidance, np.float32)
        return f

    def encode_prompts(self, root: Path, prompts: list[str], cfg) -> list[np.ndarray]:
        """T5 token embeddings [n, text_length, D_T5] and CLIP pooled embeddings [n, D_CLIP] of ``prompts``.

        A prompt longer than the built text length is refused (diffusers would cut it silently)."""
        pipe = self.text_pipeline(root)
        for i, p in enumerate(prompts):
            n = len(pipe.tokenizer_2(p).input_ids)
            if n > cfg.text_length:
                raise InputError(
                    f"prompt {i} is {n} T5 tokens, expected at most the built text length {cfg.text_length}; "
                    f"shorten it or rebuild with --text-length {min(n, 512)}"
                )
        with torch.no_grad(), quiet_loading():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=cfg.text_length
            )
        return [embeds.float().numpy(), pooled.float().numpy()]


RUNTIME = FluxRuntime()
generate = RUNTIME.generate
