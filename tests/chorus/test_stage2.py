"""Stage 2: prompt difference, region masks, TGAA, region-restricted computation and its cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import chorus.stage2
from chorus.attention import Stage2Controller, transformer_flops
from chorus.models.loading import load_minilm
from chorus.planner import PlannerConfig
from chorus.regions import MaskConfig, prompt_diff, region_mask
from chorus.stage2 import Stage2Config

# 64x64, 5 frames: the tiny Wan VAE gives a 2x8x8 latent, patches of 2x2 give a 2x4x4 = 32-token grid.
GRID_ARGS = dict(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=1.0)
# Any match is a hit: k1 = 1, k2 = 3 of 4 steps; stage 2 is kept whatever the mask fraction.
PLAN = PlannerConfig(stage1=((0.0, 0.25),), stage2=((0.0, 0.75),), full_stage2_mask=1.0, no_stage2_mask=1.0)
SOURCE, TARGET = "a red circle moving left", "a blue circle moving left"


# FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA dispatches to here; count it as
# torch counts SDPA elsewhere (2 matmuls of [Lq, d] x [d, Lk]).
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA.default not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)


@pytest.fixture
def fixed_mask(monkeypatch):
    """Replace the attention-derived mask by a chosen one, to test region reuse on its own."""

    def use(mask_fn):
        monkeypatch.setattr(chorus.stage2, "region_mask", lambda grid, *a, **k: mask_fn(grid))

    return use


def left_half(grid):
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[:, :, : grid[2] // 2] = True
    return mask


def test_prompt_diff_maps_words_to_encoder_tokens():
    tokenizer, _ = load_minilm()
    diff = prompt_diff(tokenizer, SOURCE, TARGET)
    assert diff.describe() == {"changed": ["blue"], "dropped": ["red"]}
    assert tokenizer.convert_ids_to_tokens(tokenizer(TARGET)["input_ids"])[diff.changed_tokens[0]] == "blue"
    swapped = prompt_diff(tokenizer, "a red circle and a blue square", "a blue circle and a red square")
    assert sorted(swapped.describe()["changed"]) == ["blue", "red"]  # same words, new roles
    multi = prompt_diff(tokenizer, "a cat", "a tabby cat")  # a word the encoder splits into several tokens
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer("a tabby cat")["input_ids"])[t] for t in multi.changed_tokens]
    assert "".join(p.removeprefix("##") for p in pieces) == "tabby"


def test_empty_prompt_difference_gives_empty_mask():
    tokenizer, _ = load_minilm()
    diff = prompt_diff(tokenizer, "A red circle moving left!", "a red   circle moving left")
    assert diff.is_empty
    q = [torch.randn(32, 2, 12)]
    k = [torch.randn(8, 2, 12)]
    assert not region_mask((2, 4, 4), diff, q, k, k).any()


def test_region_mask_follows_the_cross_attention_to_changed_tokens():
    tokenizer, _ = load_minilm()
    diff = prompt_diff(tokenizer, SOURCE, TARGET)
    changed = diff.changed_tokens[0]
    grid, heads, dim, text = (2, 8, 8), 2, 16, 10
    keys = torch.randn(text, heads, dim)
    queries = torch.randn(math.prod(grid), heads, dim) * 0.1
    object_tokens = torch.zeros(grid, dtype=torch.bool)
    object_tokens[:, 2:4, 5:7] = True  # where "the blue circle" is
    queries[object_tokens.flatten()] = keys[changed] * 3  # these video tokens attend to "blue"
    mask = region_mask(grid, diff, [queries], [keys], [keys], MaskConfig(dilate=1, temporal_window=0))
    assert mask[object_tokens].all()
    assert mask.float().mean() < 0.3  # dilated by one token, not the whole frame
    assert not mask[:, 6:, :3].any()


def test_tgaa_alpha_one_is_identity_and_alpha_biases_the_changed_tokens(tiny_adapter):
    transformer = tiny_adapter.transformer
    latents = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 12, transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        reference = transformer(latents, t, context, return_dict=False)[0]
    controller = Stage2Controller(transformer)
    try:
        rt = controller.runtime
        rt.mode = "active"  # Chorus's processors compute, with no bias: alpha = 1
        with torch.no_grad():
            assert torch.equal(transformer(latents, t, context, return_dict=False)[0], reference)
        # With a bias, each cross-attention equals softmax(QK^T / sqrt(d) + bias) V computed by hand.
        bias = torch.zeros(12)
        bias[3] = math.log(4.0)
        rt.text_bias = bias
        attn = transformer.blocks[0].attn2
        hidden = torch.randn(1, 32, attn.inner_dim)
        enc = torch.randn(1, 12, attn.inner_dim)
        with torch.no_grad():
            out = attn(hidden, enc)
            q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            k = attn.norm_k(attn.to_k(enc)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            v = attn.to_v(enc).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
            manual = attn.to_out[0]((probs @ v).transpose(1, 2).flatten(2))
            plain = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
        assert (probs[..., 3] > plain[..., 3]).all()  # amplified toward the changed token
    finally:
        controller.remove()
        rt.reset()


def test_mask_of_all_ones_equals_full_computation(make_engine, fixed_mask):
    fixed_mask(lambda grid: torch.ones(grid, dtype=torch.bool))
    plain = make_engine(PLAN, stage2=Stage2Config(enabled=False))
    regional = make_engine(PLAN, stage2=Stage2Config(alpha=1.0))
    for engine in (plain, regional):
        engine.generate(SOURCE, seed=1, **GRID_ARGS)
    full = plain.generate(TARGET, seed=2, **GRID_ARGS)
    masked = regional.generate(TARGET, seed=2, **GRID_ARGS)
    assert full.report.k1 == masked.report.k1 == 1 and masked.report.k2 == 3
    assert masked.report.mask_fraction == 1.0 and masked.report.stage2_restricted_steps == [1, 2]
    np.testing.assert_allclose(masked.frames, full.frames, rtol=0, atol=1e-5)


def test_region_reuse_keeps_unmasked_tokens_on_the_source_trajectory(make_engine, fixed_mask):
    fixed_mask(left_half)
    engine = make_engine(PLAN, stage2=Stage2Config(alpha=2.0))
    source = engine.generate(SOURCE, seed=1, **GRID_ARGS)
    hit = engine.generate(TARGET, seed=2, **GRID_ARGS)
    r = hit.report
    assert (r.k1, r.k2, r.mask_fraction, r.alpha) == (1, 3, 0.5, 2.0)
    assert r.prompt_diff == {"changed": ["blue"], "dropped": ["red"]} and r.stage2_restricted_steps == [1, 2]
    src = engine.cache.load(source.report.request_id).trajectory.float()
    tgt = engine.cache.load(r.request_id).trajectory.float()
    outside = ~engine.region_reuse.latent_mask(left_half((2, 4, 4)))[0].expand_as(src[0])
    for step in (2, 3):  # after each stage-2 step: unmasked latents are exactly the source's
        assert torch.equal(tgt[step][outside], src[step][outside])
        assert not torch.equal(tgt[step][~outside], src[step][~outside])  # the masked half was recomputed
    assert not torch.equal(tgt[4][outside], src[4][outside])  # stage 3 recomputes everything


def test_stage2_step_work_shrinks_with_the_mask_fraction(make_engine, fixed_mask, tiny_adapter):
    flops_per_call = []
    counter = {}

    def start(module, args):
        counter["mode"] = FlopCounterMode(display=False)
        counter["mode"].__enter__()

    def stop(module, args, output):
        counter["mode"].__exit__(None, None, None)
        flops_per_call.append(counter["mode"].get_total_flops())

    for fraction, mask_fn in ((0.5, left_half), (0.25, lambda g: left_half(g) & (torch.arange(g[1]) < 2)[:, None])):
        fixed_mask(mask_fn)
        engine = make_engine(PLAN)
        engine.generate(SOURCE, seed=1, **GRID_ARGS)
        handles = [tiny_adapter.transformer.register_forward_pre_hook(start)]
        handles.append(tiny_adapter.transformer.register_forward_hook(stop))
        try:
            flops_per_call.clear()
            hit = engine.generate(TARGET, seed=2, **GRID_ARGS)
        finally:
            for h in handles:
                h.remove()
        r = hit.report
        assert r.mask_fraction == fraction and r.stage2_restricted_steps == [1, 2]
        stage2_flops, full_flops = flops_per_call[0], flops_per_call[2]  # steps 1, 2 restricted; step 3 full
        assert flops_per_call[1] == stage2_flops
        assert full_flops == pytest.approx(r.flops_full_step, rel=0.02)
        assert stage2_flops == pytest.approx(r.flops_stage2_step, rel=0.02)
        # The per-token work scales with f; the fixed part (patch embedding, text and time projections) does not.
        fixed = transformer_flops(tiny_adapter.transformer, 32, 512, 0)
        assert (stage2_flops - fixed) / (full_flops - fixed) == pytest.approx(fraction, rel=0.15)


def test_report_without_stage2_features_falls_back_to_full_steps(make_engine):
    engine = make_engine(PLAN, stage2=Stage2Config(max_feature_bytes=0))  # the source records no features
    engine.generate(SOURCE, seed=1, **GRID_ARGS)
    hit = engine.generate(TARGET, seed=2, **GRID_ARGS)
    assert hit.report.outcome == "hit" and hit.report.mask_fraction is None and hit.report.transformer_calls == 3


def test_combines_with_an_intra_request_cache(make_engine, fixed_mask):
    from diffusers import FirstBlockCacheConfig

    fixed_mask(left_half)
    # A threshold that never skips: the source records its features at every step, and First-Block-Cache's
    # hooks still see the region-restricted steps' shorter token sequences (which the engine must shield them from).
    engine = make_engine(PLAN, intra=FirstBlockCacheConfig(threshold=1e-9))
    engine.generate(SOURCE, seed=1, **GRID_ARGS)
    hit = engine.generate(TARGET, seed=2, **GRID_ARGS)
    assert hit.report.stage2_restricted_steps == [1, 2] and np.isfinite(hit.frames).all()
