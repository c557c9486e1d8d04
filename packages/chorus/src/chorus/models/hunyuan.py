"""HunyuanVideo (`HunyuanVideoPipeline`): a dual-stream then single-stream MM-DiT with a Llama and a CLIP text
encoder, flow matching, guidance-distilled.

Its attention is joint over text and video tokens, so stage 2's region steps do not apply (they are computed in
full; `chorus.stage2.hooks.NO_REGION`); reuse of whole steps does. `guidance_scale` is the model's embedded
(distilled) guidance, as in the pipeline; true classifier-free guidance (`true_cfg_scale`) is not offered.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from .base import ModelDefaults, PipelineAdapter, PromptEmbeds
from .codecs import frames_from_video

# The card's 720p setting; 256 Llama tokens after the template, as the pipeline's default.
DEFAULTS = ModelDefaults(720, 1280, 129, 50, 6.0, "", 256)


class HunyuanVideoAdapter(PipelineAdapter):
    family = "hunyuanvideo"

    def __init__(self, pipe, *, name: str, device, defaults: ModelDefaults = DEFAULTS):
        super().__init__(
            pipe,
            name=name,
            device=device,
            defaults=defaults,
            spatial=pipe.vae_scale_factor_spatial,
            temporal=pipe.vae_scale_factor_temporal,
        )

    def scheduler_for(self, num_steps: int, latent_shape):
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], device=self.device)
        return scheduler

    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length) -> PromptEmbeds:
        def encode():
            with torch.no_grad():
                return self.pipe.encode_prompt(
                    prompt=prompt,
                    prompt_template=DEFAULT_PROMPT_TEMPLATE,
                    device=self.device,
                    max_sequence_length=max_sequence_length,
                )

        embeds, pooled, mask = self._memoised(("hunyuan", prompt, max_sequence_length), encode)
        dtype = self.dtype
        guidance = torch.tensor([guidance_scale], dtype=dtype, device=self.device) * 1000.0
        extra = {"encoder_attention_mask": mask.to(dtype), "pooled_projections": pooled.to(dtype), "guidance": guidance}
        return PromptEmbeds(cond=embeds.to(dtype), uncond=None, cond_kwargs=extra)

    def _forward(self, transformer, latents, t, text, extra, attention_kwargs):
        return transformer(
            hidden_states=latents.to(self.dtype),
            timestep=t.expand(latents.shape[0]).to(latents.dtype),
            encoder_hidden_states=text,
            attention_kwargs=attention_kwargs,
            return_dict=False,
            **extra,
        )[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        video = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return frames_from_video(video, self.pipe.video_processor)[0]


def adapter_from_pipeline(pipe, *, name: str, device="cpu") -> HunyuanVideoAdapter:
    return HunyuanVideoAdapter(pipe, name=name, device=device)
