"""Latent codecs: how an adapter turns denoised latents into frames (and, for training, back).

A Wan pipeline decodes with its `AutoencoderKLWan`; the built-in model denoises in pixel space, so its latents
already are the video. Both expose the same small interface so the engine never asks which one it has.
"""

from __future__ import annotations

import torch
from diffusers.video_processor import VideoProcessor


class WanVAECodec:
    """Decodes exactly as `WanPipeline.__call__` does: undo the latent normalisation, VAE-decode, postprocess."""

    def __init__(self, vae):
        self.vae = vae
        self.scale_spatial = int(vae.config.scale_factor_spatial)
        self.scale_temporal = int(vae.config.scale_factor_temporal)
        self.channels = int(vae.config.z_dim)
        self.video_processor = VideoProcessor(vae_scale_factor=self.scale_spatial)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.scale_temporal + 1

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F', H', W'] -> frames [B, F, H, W, 3] float32 in [0, 1]."""
        cfg = self.vae.config
        latents = latents.to(self.vae.device, dtype=self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        video = self.video_processor.postprocess_video(video, output_type="pt")  # [B, F, 3, H, W]
        return video.permute(0, 1, 3, 4, 2).float().cpu()


class PixelCodec:
    """Pixel-space latents: [B, 3, F, H, W] in [-1, 1] are the video itself."""

    channels = 3
    scale_spatial = 1
    scale_temporal = 1

    def latent_frames(self, num_frames: int) -> int:
        return num_frames

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = (latents.float().clamp(-1, 1) + 1) / 2
        return video.permute(0, 2, 3, 4, 1).cpu()  # [B, F, H, W, 3]

    @staticmethod
    def encode(frames: torch.Tensor) -> torch.Tensor:
        """frames [B, F, H, W, 3] in [0, 1] -> latents [B, 3, F, H, W] in [-1, 1] (for training)."""
        return frames.permute(0, 4, 1, 2, 3) * 2 - 1


class LatentGrid:
    """How a family's VAE maps frames to latents, for the families whose adapter decodes through its pipeline's own
    steps (HunyuanVideo, LTX-Video, CogVideoX): their `decode` is the adapter's."""

    def __init__(self, vae, scale_spatial: int, scale_temporal: int, channels: int):
        self.vae = vae
        self.scale_spatial, self.scale_temporal, self.channels = int(scale_spatial), int(scale_temporal), channels

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.scale_temporal + 1


def frames_from_video(video: torch.Tensor, processor: VideoProcessor) -> torch.Tensor:
    """A VAE's decoded `[B, 3, F, H, W]` in [-1, 1] as frames `[B, F, H, W, 3]` float32 in [0, 1], as the pipelines
    postprocess it."""
    video = processor.postprocess_video(video, output_type="pt")  # [B, F, 3, H, W]
    return video.permute(0, 1, 3, 4, 2).float().cpu()
