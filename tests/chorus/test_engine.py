"""The engine: WanPipeline equivalence, transformer-call accounting, stage-1 reuse, exact repeats."""

from __future__ import annotations

import re

import numpy as np
import pytest

from chorus.engine import ChorusEngine
from chorus.models import load_adapter
from chorus.planner import PlannerConfig
from chorus.request import RequestError

from .conftest import CFG_REQUEST, TINY, build_tiny_wan_pipeline, wan_pipeline_frames

# Reuse whatever is at least this similar, 2 of 4 steps: makes hits deterministic in tests.
ALWAYS_REUSE_HALF = PlannerConfig(stage1=((0.0, 0.5),), stage2=((0.0, 0.5),))


@pytest.mark.parametrize("scheduler", ["euler", pytest.param("unipc", marks=pytest.mark.slow)])
def test_caching_off_reproduces_wan_pipeline(tmp_path, scheduler):
    build_tiny_wan_pipeline(scheduler).save_pretrained(tmp_path)
    expected = wan_pipeline_frames(tmp_path)
    result = ChorusEngine(load_adapter(tmp_path)).generate(**CFG_REQUEST)
    assert result.frames.shape == expected.shape
    assert np.abs(result.frames - expected).max() <= 1e-5
    assert result.report.outcome == "off"
    assert result.report.transformer_calls == 2 * 4  # conditional and unconditional pass per step


def test_miss_makes_n_calls_and_stage1_hit_makes_n_minus_k1(make_engine):
    engine = make_engine(ALWAYS_REUSE_HALF)
    miss = engine.generate("a red circle moving left", seed=1, num_inference_steps=4, guidance_scale=1.0, **TINY)
    assert miss.report.outcome == "miss" and miss.report.transformer_calls == 4 and miss.report.stored
    hit = engine.generate("a blue circle moving left", seed=2, num_inference_steps=4, guidance_scale=1.0, **TINY)
    r = hit.report
    assert r.outcome == "hit" and r.k1 == 2 and r.source_id == miss.report.request_id
    assert r.transformer_calls == 4 - r.k1 == r.steps_computed
    assert r.source_prompt == "a red circle moving left" and 0 < r.similarity < 1
    assert set(r.seconds) >= {"retrieval", "encode", "stage3", "decode"} and "stage1" not in r.seconds


def test_hit_differs_from_miss_only_through_reused_steps(make_engine):
    engine = make_engine(ALWAYS_REUSE_HALF)
    args = dict(seed=5, num_inference_steps=4, guidance_scale=1.0, **TINY)
    source = engine.generate("a green square moving up", **args)
    # The same request but for whitespace (cleaned away before encoding), so not an exact repeat: its first two
    # steps would be identical to the source's, and so reusing them must give exactly the miss's frames.
    same = engine.generate("a green square moving up ", **args)
    assert same.report.outcome == "hit" and same.report.transformer_calls == 2
    np.testing.assert_array_equal(same.frames, source.frames)

    # A different prompt: the hit equals continuing the target's own loop from the source's latent at k1.
    hit = engine.generate("a yellow triangle moving down", **{**args, "seed": 6})
    adapter = engine.adapter
    entry = engine.cache.load(hit.report.source_id)
    embeds = adapter.encode_prompt("a yellow triangle moving down", "", 1.0, adapter.defaults.max_sequence_length)
    scheduler = adapter.new_scheduler()
    scheduler.set_timesteps(4)
    latents = entry.trajectory[2][None].float()
    for i in range(2, 4):
        t = scheduler.timesteps[i]
        noise = adapter.predict(latents, t, embeds, 1.0, step_index=i, sigma=0.0, num_steps=4)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    np.testing.assert_array_equal(hit.frames, adapter.decode(latents).numpy())


def test_exact_repeat_skips_denoising(make_engine):
    engine = make_engine()
    args = dict(seed=3, num_inference_steps=4, guidance_scale=1.0, **TINY)
    first = engine.generate("a purple circle standing still", **args)
    again = engine.generate("a purple circle standing still", **args)
    assert again.report.outcome == "exact" and again.report.transformer_calls == 0
    assert again.report.source_id == first.report.request_id
    np.testing.assert_array_equal(again.frames, first.frames)
    other_seed = engine.generate("a purple circle standing still", **{**args, "seed": 4})
    assert other_seed.report.outcome != "exact" and other_seed.report.transformer_calls > 0


def test_reuse_only_within_the_same_signature(make_engine):
    engine = make_engine(ALWAYS_REUSE_HALF)
    engine.generate("a red circle moving left", seed=1, num_inference_steps=4, guidance_scale=1.0, **TINY)
    other_steps = engine.generate("a red circle moving left", seed=1, num_inference_steps=6, guidance_scale=1.0, **TINY)
    assert other_steps.report.outcome == "miss" and other_steps.report.transformer_calls == 6


def test_cache_policies(make_engine):
    engine = make_engine(ALWAYS_REUSE_HALF)
    args = dict(num_inference_steps=4, guidance_scale=1.0, **TINY)
    engine.generate("a red circle moving left", seed=1, **args)
    off = engine.generate("a red circle moving right", seed=1, cache_policy="off", **args)
    assert off.report.outcome == "off" and not off.report.stored and len(engine.cache) == 1
    refresh = engine.generate("a red circle moving right", seed=1, cache_policy="refresh", **args)
    assert refresh.report.outcome == "miss" and refresh.report.transformer_calls == 4 and len(engine.cache) == 2


BAD_INPUT = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 201}, "num_inference_steps=201: input should be less than or equal to 200"),
    ({"height": 17}, "height"),
    ({"width": 0}, "width"),
    ({"num_frames": 4}, "num_frames"),
    ({"num_frames": 85}, "num_frames=85: at most 81"),  # the model's default frame count at most
    ({"seed": -1}, "seed"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"cache_policy": "sometimes"}, "cache_policy"),
]


def test_bad_input_is_refused_and_leaves_the_cache_as_it_was(make_engine):
    engine = make_engine()
    engine.generate("a red circle moving left", seed=1, num_inference_steps=2, guidance_scale=1.0, **TINY)
    calls = engine._calls
    for kwargs, message in BAD_INPUT:
        args = {"prompt": "a blue square", "seed": 1, "num_inference_steps": 2, "guidance_scale": 1.0, **TINY, **kwargs}
        prompt = args.pop("prompt")
        with pytest.raises(RequestError, match=re.escape(message)) as info:
            engine.generate(prompt, **args)
        assert info.value.param == message.split("=")[0].split(":")[0], info.value.param
        assert len(engine.cache) == 1 and engine._calls == calls  # nothing stored, nothing computed
