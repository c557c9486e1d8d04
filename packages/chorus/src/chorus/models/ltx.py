"""LTX-Video (`LTXPipeline`): a DiT with self-attention over video tokens and cross-attention to T5 text tokens,
flow matching with a resolution-dependent shift.

The transformer takes packed tokens `[B, F*H*W, C]`; the adapter packs and unpacks around each call, so the engine
keeps its `[B, C, F, H, W]` latents. Stage 2's region steps run on it (`chorus.stage2.ltx`). Decoding uses the
pipeline's defaults (`decode_timestep` 0, no decode noise).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

from .base import ModelDefaults, PipelineAdapter, PromptEmbeds
from .codecs import frames_from_video

# The pipeline's defaults: 704x480, 161 frames at 25 fps, 50 steps, guidance 3.0, 128 T5 tokens.
DEFAULTS = ModelDefaults(480, 704, 161, 50, 3.0, "", 128)
FRAME_RATE = 25  # the pipeline's default; it scales the rotary embedding's time axis


class LTXVideoAdapter(PipelineAdapter):
    family = "ltx-video"

    def __init__(self, pipe, *, name: str, device, defaults: ModelDefaults = DEFAULTS):
        super().__init__(
            pipe,
            name=name,
            device=device,
            defaults=defaults,
            spatial=pipe.vae_spatial_compression_ratio,
            temporal=pipe.vae_temporal_compression_ratio,
        )

    def latent_shape(self, height, width, num_frames):
        s = self.codec.scale_spatial
        return (1, self.codec.channels, self.codec.latent_frames(num_frames), height // s, width // s)

    def scheduler_for(self, num_steps: int, latent_shape):
        _, _, f, h, w = latent_shape
        cfg = self.scheduler_config
        mu = calculate_shift(
            f * h * w,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device=self.device)
        return scheduler

    def tokens(self, prompt: str) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.tokenizer(prompt)["input_ids"])

    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length) -> PromptEmbeds:
        def encode(text):
            with torch.no_grad():
                embeds, mask = self.pipe._get_t5_prompt_embeds(
                    text, max_sequence_length=max_sequence_length, device=self.device, dtype=self.text_encoder.dtype
                )
            return embeds, mask

        cond, mask = self._memoised(("ltx", prompt, max_sequence_length), lambda: encode(prompt))
        embeds = PromptEmbeds(cond=cond, uncond=None, tokens=self.tokens(prompt))
        embeds.cond_kwargs = {"encoder_attention_mask": mask}
        if guidance_scale > 1.0:
            negative = negative_prompt or ""
            embeds.uncond, mask = self._memoised(("ltx", negative, max_sequence_length), lambda: encode(negative))
            embeds.uncond_kwargs = {"encoder_attention_mask": mask}
        return embeds

    def _forward(self, transformer, latents, t, text, extra, attention_kwargs):
        _, _, f, h, w = latents.shape
        pt, p, _ = self.patch_size
        s, st = self.codec.scale_spatial, self.codec.scale_temporal
        out = transformer(
            hidden_states=self.pipe._pack_latents(latents, p, pt).to(text.dtype),
            encoder_hidden_states=text,
            timestep=t.expand(latents.shape[0]),
            num_frames=f // pt,
            height=h // p,
            width=w // p,
            rope_interpolation_scale=(st / FRAME_RATE, s, s),
            attention_kwargs=attention_kwargs,
            return_dict=False,
            **extra,
        )[0]
        return self.pipe._unpack_latents(out.float(), f // pt, h // p, w // p, p, pt)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        latents = self.pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(self.dtype)
        timestep = None
        if vae.config.timestep_conditioning:  # the pipeline's default decode_timestep 0 and no decode noise
            timestep = torch.tensor([0.0], device=latents.device, dtype=latents.dtype)
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return frames_from_video(video, self.pipe.video_processor)[0]


def adapter_from_pipeline(pipe, *, name: str, device="cpu") -> LTXVideoAdapter:
    return LTXVideoAdapter(pipe, name=name, device=device)
