"""Shared fixtures: a tiny, randomly initialised Wan pipeline saved as a diffusers directory (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch


def build_tiny_wan_pipeline(scheduler: str = "euler"):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    from chorus.models.loading import load_minilm

    torch.manual_seed(0)
    tokenizer, text_encoder = load_minilm()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=text_encoder.config.hidden_size,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    if scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched, transformer=transformer
    )


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A `WanPipeline.save_pretrained` directory of a tiny random pipeline."""
    path = tmp_path_factory.mktemp("tiny-wan")
    build_tiny_wan_pipeline().save_pretrained(path)
    return path


TINY = {"height": 16, "width": 16, "num_frames": 5}


@pytest.fixture(scope="session")
def embedder():
    from chorus.embed import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def tiny_adapter(tiny_wan_dir):
    from chorus.models import load_adapter

    return load_adapter(tiny_wan_dir)


@pytest.fixture
def make_engine(tiny_adapter, embedder):
    """An engine over the tiny pipeline with a fresh in-memory cache (float32 cache unless asked otherwise)."""
    from chorus.cache import MemoryStore, RequestCache
    from chorus.engine import ChorusEngine
    from chorus.planner import Planner, PlannerConfig

    engines = []

    def make(planner: PlannerConfig | None = None, store=None, cache_dtype=torch.float32, stage2=None, intra=None):
        cache = RequestCache(store or MemoryStore(1 << 30), embedder.dim)
        engine = ChorusEngine(
            tiny_adapter, cache, embedder, Planner(planner), cache_dtype=cache_dtype, stage2=stage2, intra_cache=intra
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:  # engines share the adapter: take their processors and hooks off again
        engine.close()
