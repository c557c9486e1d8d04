"""Stage 2 on a tiny random Wan pipeline: the first-step comparison, region steps, TGAA, what is recorded and stored,
and what a hit costs."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from chorus.cache import FINAL_LATENT, PROBE, TRAJECTORY, UNSETTLED
from chorus.models.loading import load_minilm
from chorus.planner import Planner, PlannerConfig
from chorus.regions import prompt_diff
from chorus.stage2 import FeatureBank, FeatureKey, transformer_flops

# 64x64, 5 frames: the tiny Wan VAE gives a 2x8x8 latent, patches of 2x2 give a 2x4x4 = 32-token grid.
GRID = (2, 4, 4)
ARGS = dict(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=1.0)
CFG_ARGS = {**ARGS, "guidance_scale": 5.0, "negative_prompt": "blurry"}
SOURCE, TARGET = "a red circle moving left", "a blue circle moving left"
# Any cached request is a candidate; on a random model the first-step predictions of two prompts differ everywhere,
# so tests choose the region themselves (`region`) or through the threshold.
ANY = PlannerConfig(min_similarity=-1.0)


# FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA dispatches to here; count it as
# torch counts SDPA elsewhere (2 matmuls of [Lq, d] x [d, Lk]).
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA.default not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)


def left_half(grid=GRID):
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[:, :, : grid[2] // 2] = True
    return mask


@pytest.fixture
def region(monkeypatch):
    """Make the planner's region a chosen mask, to test the region machinery on its own."""

    def use(mask):
        monkeypatch.setattr(Planner, "_region", lambda self, difference, unsettled=None: mask.clone())

    return use


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
    assert prompt_diff(tokenizer, "A red circle moving left!", "a red   circle moving left").is_empty


def test_feature_bank_names_round_trip_and_say_which_steps_are_complete():
    k, v = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    tensors = {FeatureKey(1, "cond", "k"): k, FeatureKey(1, "cond", "v"): v, FeatureKey(2, "cond", "k"): k}
    bank = FeatureBank(tensors)
    assert FeatureBank.from_tensors({**bank.to_tensors(), "trajectory": k}) == bank
    assert FeatureKey.parse("features/uncond/12/v") == FeatureKey(12, "uncond", "v")
    assert FeatureKey.parse("trajectory") is None
    assert bank.steps_for(["cond"]) == {1} and bank.steps_for(["cond", "uncond"]) == set()  # step 2 lacks its values
    assert FeatureBank.names([2, 1], ["cond"]) == [f"features/cond/{s}/{x}" for s in (1, 2) for x in "kv"]
    with pytest.raises(ValueError):
        FeatureKey(1, "negative", "k")


def test_recording_leaves_a_miss_bit_identical_and_records_only_what_later_hits_use(make_engine, tiny_adapter):
    from chorus.engine import ChorusEngine

    off = ChorusEngine(tiny_adapter).generate(SOURCE, seed=1, **CFG_ARGS)
    engine = make_engine(ANY)
    miss = engine.generate(SOURCE, seed=1, **CFG_ARGS)
    np.testing.assert_array_equal(miss.frames, off.frames)
    # What was recorded: the keys and values of every layer, both branches, at the steps a region can cover
    # (every step after the first), in the cache dtype; each tensor kept by reference once, then stacked.
    cfg = tiny_adapter.transformer.config
    layers, dim, tokens = cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, math.prod(GRID)
    steps = Planner(ANY).feature_steps(4)
    assert steps == [1, 2, 3]
    entry = engine.cache.load(miss.report.request_id)
    bank = entry.features
    assert set(bank) == {FeatureKey(s, b, x) for s in steps for b in ("cond", "uncond") for x in "kv"}
    assert bank.nbytes == len(steps) * 2 * 2 * layers * tokens * dim * 4  # float32 cache in these tests
    assert all(t.shape == (layers, tokens, dim) for t in bank.values())
    assert engine.hooks.run.recorder is None  # nothing is held after the request
    assert entry.probe.shape == entry.trajectory.shape[1:]


def test_recorded_keys_are_the_ones_the_attention_used(make_engine, tiny_adapter):
    """Region steps rely on them: the bank's keys at a step equal the model's own rotated keys there."""
    from chorus.stage2.wan import apply_rotary_emb

    engine = make_engine(ANY)
    seen = {}

    def capture(module, args, kwargs, output):
        seen["hidden"], seen["rotary"] = args[0], args[3]

    attn = tiny_adapter.transformer.blocks[1].attn1
    step = {}

    def count(module, args):
        step["n"] = step.get("n", -1) + 1
        if step["n"] == 2:  # the third transformer call is step 2
            seen["armed"] = True

    handles = [tiny_adapter.transformer.register_forward_pre_hook(count)]
    handles.append(
        attn.register_forward_hook(
            lambda m, a, kw, o: capture(m, a, kw, o) if seen.pop("armed", False) else None, with_kwargs=True
        )
    )
    try:
        result = engine.generate(SOURCE, seed=3, **ARGS)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        key = attn.norm_k(attn.to_k(seen["hidden"])).unflatten(2, (attn.heads, -1))
        key = apply_rotary_emb(key, *seen["rotary"]).flatten(2)[0]
    bank = engine.cache.load(result.report.request_id).features
    torch.testing.assert_close(bank[FeatureKey(2, "cond", "k")][1], key, rtol=0, atol=1e-6)


def test_region_steps_keep_the_rest_on_the_source_trajectory(make_engine, region):
    region(left_half())
    engine = make_engine(ANY)
    source = engine.generate(SOURCE, seed=1, **ARGS)
    hit = engine.generate(TARGET, seed=2, **ARGS)
    r = hit.report
    assert (r.outcome, r.difference, r.plan, r.mask_fraction) == ("hit", "local", "crrr", 0.5)
    assert r.stage2_steps == [1, 2, 3] and r.prompt_diff == {"changed": ["blue"], "dropped": ["red"]}
    assert r.source_id == source.report.request_id and r.alpha == 2.0 and r.candidates_compared == 1
    src = engine.cache.load(source.report.request_id, {TRAJECTORY}).trajectory.float()
    tgt = engine.cache.load(r.request_id, {TRAJECTORY}).trajectory.float()
    outside = ~engine._latent_mask(left_half())[0].expand_as(src[0])
    assert not torch.equal(tgt[1], src[1])  # the first step is the request's own, from its own noise
    for step in (2, 3, 4):  # after each region step: outside the region, exactly the source's latent
        assert torch.equal(tgt[step][outside], src[step][outside])
        assert not torch.equal(tgt[step][~outside], src[step][~outside])  # inside, recomputed


def test_a_region_of_every_token_computes_what_a_full_step_would(make_engine, region):
    """Region steps are full steps restricted: with every token in the region, the source's keys and values are all
    replaced by the request's own, and the result equals computing every step in full."""
    region(torch.ones(GRID, dtype=torch.bool))
    engine = make_engine(PlannerConfig(min_similarity=-1.0, max_region=1.0, alpha=1.0))
    engine.generate(SOURCE, seed=1, **ARGS)
    hit = engine.generate(TARGET, seed=2, **ARGS)
    assert hit.report.plan == "crrr" and hit.report.mask_fraction == 1.0
    full = engine.generate(TARGET, seed=2, cache_policy="off", **ARGS)
    np.testing.assert_allclose(hit.frames, full.frames, rtol=0, atol=1e-5)


def transformer_flops_counted(transformer, run):
    """FLOPs of every transformer call made by `run()`, counted by torch, one list entry per call."""
    per_call, counter = [], {}

    def start(module, args):
        counter["mode"] = FlopCounterMode(display=False)
        counter["mode"].__enter__()

    def stop(module, args, output):
        counter["mode"].__exit__(None, None, None)
        per_call.append(counter["mode"].get_total_flops())

    handles = [transformer.register_forward_pre_hook(start), transformer.register_forward_hook(stop)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, per_call


def test_a_hit_computes_exactly_the_flops_its_plan_predicts(make_engine, region, tiny_adapter):
    transformer = tiny_adapter.transformer
    for mask, fraction in ((left_half(), 0.5), (left_half() & (torch.arange(4) < 2)[:, None], 0.25)):
        region(mask)
        engine = make_engine(ANY)
        engine.generate(SOURCE, seed=1, **CFG_ARGS)
        hit, per_call = transformer_flops_counted(transformer, partial(engine.generate, TARGET, seed=2, **CFG_ARGS))
        r = hit.report
        assert r.mask_fraction == fraction and r.plan == "crrr" and len(per_call) == 8  # 4 steps, 2 branches
        assert sum(per_call) == pytest.approx(r.flops, rel=0.01)
        assert sum(per_call[:2]) == pytest.approx(r.flops_full_step, rel=0.01)  # the first step, in full
        assert sum(per_call[2:4]) == pytest.approx(r.flops_region_step, rel=0.01)
        # The per-token work scales with the region; the fixed part (patch embedding, text and time projections)
        # does not.
        fixed = 2 * transformer_flops(transformer, 32, 512, 0)
        assert (r.flops_region_step - fixed) / (r.flops_full_step - fixed) == pytest.approx(fraction, rel=0.15)


def test_no_difference_reuses_every_later_step_and_stores_an_alias(make_engine):
    engine = make_engine(PlannerConfig(min_similarity=-1.0, threshold=1e9))  # nothing differs
    source = engine.generate(SOURCE, seed=1, **ARGS)
    hit = engine.generate(TARGET, seed=2, **ARGS)
    r = hit.report
    assert (r.outcome, r.difference, r.plan, r.transformer_calls, r.flops) == (
        "hit",
        "none",
        "c---",
        1,
        r.flops_full_step,
    )
    np.testing.assert_array_equal(hit.frames, source.frames)  # every later step was the source's
    meta = next(m for m in engine.cache.store.metas() if m.entry_id == r.request_id)
    assert meta.alias_of == source.report.request_id and meta.nbytes == 0
    again = engine.generate(TARGET, seed=2, **ARGS)  # the alias serves exact repeats of its own request
    assert again.report.outcome == "exact" and again.report.transformer_calls == 0
    np.testing.assert_array_equal(again.frames, source.frames)
    engine.cache.store.remove(source.report.request_id)  # the alias goes with its origin
    assert len(engine.cache.store) == 0


def test_a_global_difference_is_computed_in_full(make_engine):
    engine = make_engine(PlannerConfig(min_similarity=-1.0, threshold=1e-9))  # every token differs
    engine.generate(SOURCE, seed=1, **ARGS)
    result = engine.generate(TARGET, seed=2, **ARGS)
    r = result.report
    assert (r.outcome, r.difference, r.plan, r.transformer_calls, r.mask_fraction) == ("miss", "global", "cccc", 4, 1.0)
    off = engine.generate(TARGET, seed=2, cache_policy="off", **ARGS)
    np.testing.assert_array_equal(result.frames, off.frames)  # nothing of the source's was used


def test_the_same_prompt_under_a_new_seed_is_a_new_sample(make_engine):
    engine = make_engine(PlannerConfig(min_similarity=-1.0, threshold=1e9))
    first = engine.generate(SOURCE, seed=1, **ARGS)
    other = engine.generate(SOURCE, seed=2, **ARGS)
    assert other.report.outcome == "miss" and other.report.miss_reason == "a new seed for a cached prompt"
    assert not np.array_equal(other.frames, first.frames)


def test_the_closest_candidate_is_the_one_whose_first_step_agrees_most(make_engine, tiny_adapter):
    engine = make_engine(PlannerConfig(min_similarity=-1.0, candidates=3, threshold=0.05, max_region=1.0))
    a = engine.generate("a red circle moving left", seed=1, **ARGS)
    engine.generate("a green triangle falling", seed=9, **ARGS)
    hit = engine.generate("a red circle moving left quickly", seed=1, **ARGS)  # same noise as `a`
    assert hit.report.candidates_compared == 2 and hit.report.source_id == a.report.request_id


def test_an_exact_repeat_and_a_comparison_load_only_what_they_need(make_engine, region, tmp_path):
    from chorus.cache import DiskStore

    region(left_half())
    store = DiskStore(tmp_path / "cache")
    engine = make_engine(ANY, store=store)
    engine.generate(SOURCE, seed=1, **ARGS)
    loads = []
    original = store._read
    store._read = lambda meta, names: loads.append(None if names is None else set(names)) or original(meta, names)
    engine.generate(SOURCE, seed=1, **ARGS)  # exact repeat
    assert loads == [{FINAL_LATENT}]
    loads.clear()
    engine.generate(TARGET, seed=2, **ARGS)  # compared, then a region hit
    assert loads[0] == {PROBE, UNSETTLED}
    assert loads[1] == {TRAJECTORY, FINAL_LATENT, *FeatureBank.names([1, 2, 3], ["cond"])}


def test_a_source_without_features_gives_full_steps(make_engine, region):
    from chorus.planner import StageOneConfig

    region(left_half())
    baseline = make_engine(StageOneConfig(table=((0.0, 0.25),)))  # records no features
    baseline.generate(SOURCE, seed=1, **ARGS)
    engine = make_engine(ANY, store=baseline.cache.store)
    hit = engine.generate(TARGET, seed=2, **ARGS)
    r = hit.report
    assert (r.outcome, r.difference, r.plan, r.transformer_calls) == ("miss", "local", "cccc", 4)
    assert r.miss_reason == "the source has no features for its region steps"


def test_tgaa_amplifies_the_new_words_in_region_steps_only(make_engine, region, tiny_adapter):
    region(left_half())
    masks = []
    attn2 = tiny_adapter.transformer.blocks[0].attn2
    processor = attn2.processor

    def recording(attn, hidden, context=None, attention_mask=None, rotary_emb=None, **kwargs):
        masks.append(attention_mask)
        return processor(attn, hidden, context, attention_mask, rotary_emb, **kwargs)

    attn2.processor = recording
    try:
        engine = make_engine(PlannerConfig(min_similarity=-1.0, alpha=4.0))
        engine.generate(SOURCE, seed=1, **ARGS)
        masks.clear()
        engine.generate(TARGET, seed=2, **ARGS)
    finally:
        attn2.processor = processor
    assert masks[0] is None  # the first step is the request's own, unbiased
    blue = prompt_diff(tiny_adapter.tokenizer, SOURCE, TARGET).changed_tokens
    for bias in masks[1:]:  # region steps: log(alpha) on the new word's tokens, nothing elsewhere
        flat = bias.flatten()
        assert torch.allclose(flat[blue], torch.tensor(math.log(4.0))) and flat.count_nonzero() == len(blue)


def test_combines_with_an_intra_request_cache(make_engine, region):
    from diffusers import FirstBlockCacheConfig

    region(left_half())
    # A threshold that never skips: First-Block-Cache's hooks still see the region steps' shorter token sequences
    # (which the engine must shield them from).
    engine = make_engine(ANY, intra=FirstBlockCacheConfig(threshold=1e-9))
    engine.generate(SOURCE, seed=1, **ARGS)
    hit = engine.generate(TARGET, seed=2, **ARGS)
    assert hit.report.stage2_steps == [1, 2, 3] and np.isfinite(hit.frames).all()


def test_closing_the_engine_takes_every_hook_off(make_engine, tiny_adapter):
    from diffusers.hooks import HookRegistry

    engine = make_engine(ANY)
    engine.close()
    names = [
        name
        for module in tiny_adapter.transformer.modules()
        if hasattr(module, "_diffusers_hook")
        for name in HookRegistry.check_if_exists_or_initialize(module).hooks
    ]
    assert not [n for n in names if n.startswith("chorus")]


def test_a_hit_serves_as_a_source_in_turn(make_engine, region):
    """A region hit records the keys and values its region steps saw (the source's, with its own region's): a later
    request can take it as its source."""
    region(left_half())
    engine = make_engine(PlannerConfig(min_similarity=-1.0, candidates=1))
    engine.generate(SOURCE, seed=1, **CFG_ARGS)
    first = engine.generate(TARGET, seed=2, **CFG_ARGS)
    stored = engine.cache.load(first.report.request_id).features
    assert stored.steps_for(["cond", "uncond"]) == {1, 2, 3}
    second = engine.generate("a blue circle moving left slowly", seed=3, **CFG_ARGS)
    assert second.report.source_id == first.report.request_id and second.report.plan == "crrr"
    assert np.isfinite(second.frames).all()


def test_a_hit_stores_the_first_step_its_video_follows(make_engine, region, tiny_adapter):
    """Outside its region a hit's video is its source's, so the probe a later request compares with is the source's
    there and the hit's own inside: otherwise each hit in a chain could drift a threshold further from what it
    shows."""
    mask = left_half()
    region(mask)
    engine = make_engine(ANY)
    source = engine.generate(SOURCE, seed=1, **ARGS)
    hit = engine.generate(TARGET, seed=2, **ARGS)
    assert hit.report.plan == "crrr"
    alone = make_engine()  # an empty cache: the same request computed in full, from the same first step
    own = alone.generate(TARGET, seed=2, **ARGS)
    stored, origin = (engine.cache.load(r.report.request_id, {PROBE}).probe for r in (hit, source))
    computed = alone.cache.load(own.report.request_id, {PROBE}).probe
    pt, ph, pw = tiny_adapter.patch_size
    inside = mask.repeat_interleave(pt, 0).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    assert torch.equal(stored[:, inside], computed[:, inside])
    assert torch.equal(stored[:, ~inside], origin[:, ~inside])
    assert not torch.equal(stored[:, ~inside], computed[:, ~inside])


def test_a_step_the_source_did_not_record_reads_its_last_recorded_step(make_engine, region):
    """An intra-request cache that skipped a step's blocks left no features there: the region step reads the
    source's last recorded step before it instead of computing in full."""
    region(left_half())
    engine = make_engine(ANY)
    source = engine.generate(SOURCE, seed=1, **ARGS)
    stored = engine.cache.store._entries[source.report.request_id]
    for kind in "kv":
        del stored.tensors[FeatureKey(2, "cond", kind).name]
    seen = []
    original = engine.hooks.source_features

    def spy():
        seen.append((engine.hooks.step, engine.hooks.run.feature_steps.get(engine.hooks.step)))
        return original()

    engine.hooks.source_features = spy
    hit = engine.generate(TARGET, seed=2, **ARGS)
    assert hit.report.plan == "crrr"
    assert sorted(set(seen)) == [(1, 1), (2, 1), (3, 3)]
