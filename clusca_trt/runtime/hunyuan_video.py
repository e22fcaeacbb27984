"""HunyuanVideo text-to-video sampling over any denoiser: the ClusCa engines (``ScheduledDenoiser``)
or a plain model call (the test oracle).

* Sampler: diffusers' ``FlowMatchEulerDiscreteScheduler`` (config from the checkpoint folder,
  recorded at build time: shift 7.0 for the released model) with the HunyuanVideo pipeline's
  sigmas ``linspace(1, 0, steps + 1)[:-1]``; 50 steps by default; embedded guidance 6.0 fed to the
  model as ``guidance * 1000`` (no second pass), the timestep as the scheduler's ``t``.
* Latents: [n, C, latent frames, H/8, W/8] drawn as ``HunyuanVideoPipeline.prepare_latents``
  does, from one ``torch.Generator`` seeded with ``seed``: a seed gives diffusers' initial noise.
* Prompts: Llama (prompt template, cropped) + CLIP in PyTorch through diffusers'
  ``HunyuanVideoPipeline.encode_prompt``, loaded from the checkpoint folder the engines were
  built from (or ``encoders=``). Precomputed ``prompt_embeds`` [n, text_length, Llama dim],
  ``pooled_prompt_embeds`` [n, CLIP dim] and ``prompt_attention_mask`` [n, text_length] skip it.
* Frames: decoded by the pipeline's ``AutoencoderKLHunyuanVideo`` in PyTorch (``runtime.decode``).
* ClusCa: the video tokens propagate with gamma; the text tokens only scatter their fresh rows
  (gamma 0, as the reference), unless ``text_propagation`` is set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..families import HUNYUAN_VIDEO
from .diffusers_common import FlowMatchingRuntime, quiet_loading



class HunyuanVideoRuntime(FlowMatchingRuntime):
    family = HUNYUAN_VIDEO
    pipeline_module = "diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video"
    pipeline_class = "HunyuanVideoPipeline"

    def noise_shape(self, cfg) -> tuple[int, ...]:
        """[C, F, H, W], as ``HunyuanVideoPipeline.prepare_latents`` draws it on the CPU."""
        return tuple(cfg.latent_shape)

    def sigmas(self, cfg, steps: int):
        """The HunyuanVideo pipeline's sigmas (the shift is in the scheduler's config)."""
        return np.linspace(1.0, 0.0, steps + 1)[:-1], {}

    def pad_chunk(self, arrays: list[np.ndarray], real: int) -> None:
        arrays[2][real:, 0] = 1.0  # a padded row attends to one text token (no empty softmax)

    def feeds(self, cfg, x, t, embeds, guidance):
        B = x.shape[0]
        f = {
            "hidden_states": x.numpy(),
            "encoder_hidden_states": embeds[0],
            "encoder_attention_mask": embeds[2],
            "pooled_projections": embeds[1],
            "timestep": t.expand(B).to(torch.float32).numpy(),
        }
        if cfg.guidance_embeds:
            f["guidance"] = (torch.tensor([guidance] * B, dtype=torch.float32) * 1000.0).numpy()
        return f

    def encode_prompts(self, root: Path, prompts: list[str], cfg) -> list[np.ndarray]:
        """Llama token embeddings [n, text_length, D], CLIP pooled embeddings [n, D_CLIP] and the token
        mask [n, text_length] of ``prompts``, as the pipeline makes them (template applied, then cropped).

        A prompt longer than the built text length is refused (diffusers would cut it silently)."""
        template = self.module().DEFAULT_PROMPT_TEMPLATE
        pipe = self.text_pipeline(root)
        for i, p in enumerate(prompts):
            n = len(pipe.tokenizer(template["template"].format(p)).input_ids) - template["crop_start"]
            if n > cfg.text_length:
                raise InputError(
                    f"prompt {i} is {n} Llama tokens, expected at most the built text length {cfg.text_length}; "
                    f"shorten it or rebuild with --text-length {n}"
                )
        with torch.no_grad(), quiet_loading():
            embeds, pooled, mask = pipe.encode_prompt(
                prompt=prompts, device=torch.device("cpu"), max_sequence_length=cfg.text_length
            )
        return [embeds.float().numpy(), pooled.float().numpy(), mask.float().numpy()]

    def check_embeds(self, cfg, given: dict) -> list[np.ndarray]:
        embeds, pooled, mask = super().check_embeds(cfg, given)
        if not np.isin(mask, (0.0, 1.0)).all() or (mask.sum(axis=1) < 1).any():
            raise InputError("prompt_attention_mask: expected 0/1 values with at least one 1 per row, got others")
        return [embeds, pooled, mask]


RUNTIME = HunyuanVideoRuntime()
generate = RUNTIME.generate
