"""CogVideoX (`CogVideoXPipeline`, 1.0: 2B and 5B): an expert-adaptive DiT with joint attention over T5 text tokens
and video tokens, sampled by DDIM with v-prediction rather than flow matching.

- The scheduler's parts of the loop are DDIM's: the clean latent a prediction implies is the step's
  `pred_original_sample`, and a replayed step's output is the one DDIM's affine step maps onto the source's latent.
  Only deterministic, stateless DDIM schedulers are served (`CogVideoXDDIMScheduler`, `DDIMScheduler`); the
  stochastic `CogVideoXDPMScheduler` (CogVideoX 1.5's) is refused by name.
- The transformer takes `[B, F, C, H, W]`; the adapter permutes around each call.
- Joint attention: stage 2's region steps are computed in full (`chorus.stage2.hooks.NO_REGION`).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from .base import ModelDefaults, PipelineAdapter, PromptEmbeds
from .codecs import frames_from_video
from .loading import ModelNotFoundError

# The pipeline's defaults: 480x720, 49 frames, 50 steps, guidance 6.0, 226 T5 tokens.
DEFAULTS = ModelDefaults(480, 720, 49, 50, 6.0, "", 226)
SCHEDULERS = ("CogVideoXDDIMScheduler", "DDIMScheduler")


class CogVideoXAdapter(PipelineAdapter):
    family = "cogvideox"

    def __init__(self, pipe, *, name: str, device, defaults: ModelDefaults = DEFAULTS):
        scheduler = type(pipe.scheduler).__name__
        if scheduler not in SCHEDULERS:
            raise ModelNotFoundError(
                f"{name}: CogVideoX with {scheduler} is not supported: Chorus replays steps of deterministic DDIM "
                f"schedulers only ({', '.join(SCHEDULERS)})"
            )
        if pipe.transformer.config.patch_size_t is not None:
            raise ModelNotFoundError(f"{name}: CogVideoX 1.5 (temporal patches) is not supported")
        super().__init__(
            pipe,
            name=name,
            device=device,
            defaults=defaults,
            spatial=pipe.vae_scale_factor_spatial,
            temporal=pipe.vae_scale_factor_temporal,
            prediction_type="flow",  # what the transformer outputs is the scheduler's business (v or epsilon)
        )

    @property
    def text_tokens(self) -> int:
        return self.defaults.max_sequence_length

    # ---- DDIM ----------------------------------------------------------------------------------------------

    def noise_level(self, scheduler, i: int) -> float:
        alpha = float(scheduler.alphas_cumprod[int(scheduler.timesteps[i])])
        return math.sqrt(1.0 - alpha)

    def predicted_clean(self, scheduler, i, latents, output):
        return scheduler.step(output, scheduler.timesteps[i], latents, return_dict=False)[1]

    def output_towards(self, scheduler, i, latents, following):
        # DDIM's step (eta 0) is affine in the model output: prev = base + slope * output, with a scalar slope.
        t = scheduler.timesteps[i]
        base = scheduler.step(torch.zeros_like(latents), t, latents, return_dict=False)[0]
        slope = scheduler.step(torch.ones_like(latents), t, latents, return_dict=False)[0] - base
        return (following - base) / slope

    def step(self, scheduler, i, output, latents):
        latents = scheduler.step(output, scheduler.timesteps[i], latents, return_dict=False)[0]
        return latents.to(self.dtype).float()  # as the pipeline, which keeps its latents in the model's dtype

    # ---- the model -----------------------------------------------------------------------------------------

    def encode_prompt(self, prompt, negative_prompt, guidance_scale, max_sequence_length) -> PromptEmbeds:
        def encode(text):
            with torch.no_grad():
                return self.pipe._get_t5_prompt_embeds(
                    text, max_sequence_length=max_sequence_length, device=self.device, dtype=self.dtype
                )

        cond = self._memoised(("cogvideox", prompt, max_sequence_length), lambda: encode(prompt))
        uncond = None
        if guidance_scale > 1.0:
            negative = negative_prompt or ""
            uncond = self._memoised(("cogvideox", negative, max_sequence_length), lambda: encode(negative))
        return PromptEmbeds(cond=cond, uncond=uncond)

    def initial_latents(self, height, width, num_frames, seed):
        # As the pipeline: noise drawn `[B, F, C, H, W]` in the model's dtype, times the scheduler's initial sigma.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        b, c, f, h, w = self.latent_shape(height, width, num_frames)
        noise = randn_tensor((b, f, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
        noise = noise * self.new_scheduler().init_noise_sigma
        return noise.permute(0, 2, 1, 3, 4).float()

    def _forward(self, transformer, latents, t, text, extra, attention_kwargs):
        _, _, f, h, w = latents.shape
        rotary = None
        if transformer.config.use_rotary_positional_embeddings:
            s = self.codec.scale_spatial
            rotary = self.pipe._prepare_rotary_positional_embeddings(h * s, w * s, f, latents.device)
        out = transformer(
            hidden_states=latents.permute(0, 2, 1, 3, 4).to(self.dtype),
            encoder_hidden_states=text,
            timestep=t.expand(latents.shape[0]),
            image_rotary_emb=rotary,
            attention_kwargs=attention_kwargs,
            return_dict=False,
            **extra,
        )[0]
        return out.float().permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents):
        video = self.pipe.decode_latents(latents.permute(0, 2, 1, 3, 4).to(self.pipe.vae.dtype))
        return frames_from_video(video, self.pipe.video_processor)[0]


def adapter_from_pipeline(pipe, *, name: str, device="cpu") -> CogVideoXAdapter:
    return CogVideoXAdapter(pipe, name=name, device=device)
