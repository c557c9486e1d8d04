"""Wan pipelines (`WanPipeline`): Wan 2.1, Wan 2.2 A14B (two experts) and Wan 2.2 TI2V-5B (per-token timesteps).

- Wan 2.2 A14B: `transformer` (high noise) runs the steps whose timestep is at least `boundary_ratio` times the
  scheduler's training timesteps, `transformer_2` (low noise) the rest. `expert_at` says which, the engine's hooks sit
  on both, features are recorded per expert, and both configs and the boundary are in the cache signature.
- Wan 2.2 TI2V-5B (`expand_timesteps`): the transformer takes one timestep per latent token (all equal for
  text-to-video); a region step passes only its tokens' timesteps (stage 2's Wan layout selects them).
"""

from __future__ import annotations

import torch

from .base import FlowVideoDiTAdapter, ModelDefaults
from .codecs import WanVAECodec

WAN21_DEFAULTS = ModelDefaults(480, 832, 81, 50, 5.0, "", 512)
# The Wan 2.2 cards' settings: A14B 480p at 40 steps, guidance 4.0; TI2V-5B 704x1280, 121 frames at 24 fps, 5.0.
WAN22_A14B_DEFAULTS = ModelDefaults(480, 832, 81, 40, 4.0, "", 512)
WAN22_TI2V_DEFAULTS = ModelDefaults(704, 1280, 121, 50, 5.0, "", 512)


class WanAdapter(FlowVideoDiTAdapter):
    """A `WanPipeline`'s components; optionally Wan 2.2's second expert and per-token timesteps."""

    def __init__(self, *, transformer_2=None, boundary_ratio: float | None = None, expand_timesteps=False, **kwargs):
        super().__init__(**kwargs)
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("a second expert needs a boundary_ratio, and a boundary_ratio a second expert")
        self.transformer_2 = transformer_2.eval() if transformer_2 is not None else None
        self.boundary_ratio = boundary_ratio
        self.expand_timesteps = bool(expand_timesteps)

    @property
    def transformers(self) -> tuple:
        return (self.transformer,) if self.transformer_2 is None else (self.transformer, self.transformer_2)

    def expert_at(self, step_index: int, t) -> int:
        if self.boundary_ratio is None:
            return 0
        boundary = self.boundary_ratio * self.scheduler_config["num_train_timesteps"]
        return 0 if float(t) >= boundary else 1  # as WanPipeline: `t >= boundary_timestep` is the high-noise expert

    def _identity_extra(self) -> dict:
        return {"boundary_ratio": self.boundary_ratio, "expand_timesteps": self.expand_timesteps}

    def _forward(self, transformer, latents, t, text, extra, attention_kwargs):
        if self.expand_timesteps:
            # As WanPipeline: one timestep per token of the 2x2-patched grid, from a mask of ones (text-to-video).
            mask = torch.ones(latents.shape, dtype=torch.float32, device=latents.device)
            timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
        else:
            timestep = t.expand(latents.shape[0])
        return transformer(
            hidden_states=latents.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=text,
            attention_kwargs=attention_kwargs,
            return_dict=False,
            **extra,
        )[0]


def family_of(config) -> str:
    if config.get("boundary_ratio") is not None:
        return "wan2.2-a14b"
    return "wan2.2-ti2v" if config.get("expand_timesteps", False) else "wan2.1"


def adapter_from_wan_pipeline(pipe, *, name: str, device: str = "cpu", defaults: ModelDefaults | None = None):
    """Wrap the components of a loaded `WanPipeline` (Wan 2.1, or Wan 2.2 with two experts or expand_timesteps)."""
    config = pipe.config
    boundary = config.get("boundary_ratio")
    transformer_2 = getattr(pipe, "transformer_2", None)
    if pipe.transformer is None:
        raise ValueError(f"{name}: a WanPipeline without its first transformer is not supported")
    if (transformer_2 is None) != (boundary is None):
        raise ValueError(f"{name}: a WanPipeline needs both transformer_2 and boundary_ratio, or neither")
    family = family_of(config)
    fallback = {"wan2.2-a14b": WAN22_A14B_DEFAULTS, "wan2.2-ti2v": WAN22_TI2V_DEFAULTS}.get(family, WAN21_DEFAULTS)
    return WanAdapter(
        name=name,
        family=family,
        transformer=pipe.transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary,
        expand_timesteps=config.get("expand_timesteps", False),
        scheduler=pipe.scheduler,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        codec=WanVAECodec(pipe.vae),
        defaults=defaults or fallback,
        device=device,
    )


def adapter_from_pipeline(pipe, *, name: str, device="cpu") -> WanAdapter:
    """The loader's entry point for this family (`loading.FAMILIES`)."""
    return adapter_from_wan_pipeline(pipe, name=name, device=device)
