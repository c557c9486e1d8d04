"""Every family Chorus serves, on a tiny random pipeline of its own (`families.py`): caching off reproduces the
family's diffusers pipeline through `chorus generate --model DIR`, a near-duplicate prompt is a hit that computes
less, region steps run (or their fallback is reported), and what the engine does not serve is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chorus.cache import TRAJECTORY, MemoryStore, RequestCache
from chorus.cli import main
from chorus.engine import ChorusEngine
from chorus.models import load_adapter
from chorus.planner import Planner, PlannerConfig
from chorus.stage2 import FeatureKey

from .families import BUILDERS, GRIDS, SETTINGS, pipeline_frames

FAMILIES = list(BUILDERS)
REGION = ["wan2.2-a14b", "wan2.2-ti2v", "ltx-video"]  # the others have joint attention: region steps in full
FALLBACK = [f for f in FAMILIES if f not in REGION]
PROMPT, EDIT = "a red circle moving left", "a blue circle moving left"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: these models are tiny, and two threads on a busy 2-core machine are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family -> a saved tiny pipeline directory, built once per module."""
    dirs = {}

    def get(family: str):
        if family not in dirs:
            dirs[family] = tmp_path_factory.mktemp(family)
            BUILDERS[family]().save_pretrained(dirs[family])
        return dirs[family]

    return get


@pytest.fixture(scope="module")
def adapters(family_dir):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_adapter(family_dir(family), device="cpu")
        return cache[family]

    return get


@pytest.fixture
def engine_for(adapters, embedder):
    engines = []

    def make(family: str, config: PlannerConfig):
        engine = ChorusEngine(
            adapters(family), RequestCache(MemoryStore(1 << 30), embedder.dim), embedder, Planner(config)
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def region(monkeypatch):
    """Make the planner's region a chosen mask (on random models the first-step predictions carry no meaning)."""

    def use(mask):
        monkeypatch.setattr(Planner, "_region", lambda self, difference, unsettled=None: mask.clone())

    return use


def left_half(grid):
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[:, :, : grid[2] // 2] = True
    return mask


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_caching_off_reproduces_the_familys_pipeline(family, family_dir, tmp_path, capsys):
    path, s = family_dir(family), SETTINGS[family]
    size = ["--height", str(s["height"]), "--width", str(s["width"]), "--frames", str(s["num_frames"])]
    steps = ["--steps", str(s["num_inference_steps"]), "--guidance", str(s["guidance_scale"])]
    out = tmp_path / "x.npy"
    args = ["generate", PROMPT, "--model", str(path), "--no-cache", "--seed", "7", *size, *steps]
    assert main([*args, "--negative-prompt", "blurry", "--out", str(out), "-q", "--json", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["family"], report["dtype"], report["outcome"]) == (family, "float32", "off")
    expected = pipeline_frames(path, family, PROMPT, 7, negative_prompt="blurry")
    frames = np.load(out)
    assert frames.shape == expected.shape
    assert np.abs(frames - expected).max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_near_duplicate_prompt_is_a_hit_that_computes_less(family, engine_for):
    # The first-step comparison alone: on a random model every token moves far from its first prediction, so the
    # default planner would recompute all of them (`late_threshold`).
    engine = engine_for(family, PlannerConfig(late_threshold=None))
    source = engine.generate(PROMPT, seed=3, **SETTINGS[family])
    near = engine.generate(PROMPT + ".", seed=3, **SETTINGS[family])
    s, r = source.report, near.report
    assert (s.outcome, r.outcome, r.difference, r.plan) == ("miss", "hit", "none", "c---")
    assert r.source_id == s.request_id and r.family == family
    assert r.transformer_calls == s.transformer_calls // 4  # the first step only
    assert r.flops == s.flops // 4 and r.flops < s.flops
    np.testing.assert_array_equal(near.frames, source.frames)  # every later step was the source's


@pytest.mark.parametrize("family", REGION)
def test_region_steps_recompute_the_region_and_follow_the_source_elsewhere(family, engine_for, region):
    mask = left_half(GRIDS[family])
    region(mask)
    engine = engine_for(family, PlannerConfig(min_similarity=-1.0))
    source = engine.generate(PROMPT, seed=1, **SETTINGS[family])
    edit = engine.generate(EDIT, seed=2, **SETTINGS[family])
    r = edit.report
    assert (r.outcome, r.difference, r.plan, r.stage2_steps, r.mask_fraction) == (
        "hit",
        "local",
        "crrr",
        [1, 2, 3],
        0.5,
    )
    assert r.stage2_fallback is None and r.flops < source.report.flops
    assert r.flops_region_step < r.flops_full_step
    src = engine.cache.load(source.report.request_id, {TRAJECTORY}).trajectory.float()
    tgt = engine.cache.load(r.request_id, {TRAJECTORY}).trajectory.float()
    outside = ~engine._latent_mask(mask)[0].expand_as(src[0])
    for step in (2, 3, 4):  # after each region step: outside the region exactly the source's latent, inside not
        assert torch.equal(tgt[step][outside], src[step][outside])
        assert not torch.equal(tgt[step][~outside], src[step][~outside])


@pytest.mark.parametrize("family", REGION)
def test_a_region_of_every_token_computes_what_full_steps_would(family, engine_for, region):
    """The source's keys and values (per expert, with per-token timesteps cut to the region) are all replaced by the
    request's own: the result equals computing every step in full."""
    region(torch.ones(GRIDS[family], dtype=torch.bool))
    engine = engine_for(family, PlannerConfig(min_similarity=-1.0, max_region=1.0, alpha=1.0))
    engine.generate(PROMPT, seed=1, **SETTINGS[family])
    hit = engine.generate(EDIT, seed=2, **SETTINGS[family])
    assert hit.report.plan == "crrr" and hit.report.mask_fraction == 1.0
    assert engine.hooks.stagings == 3 * 2  # the source's features fetched once per region step and branch
    full = engine.generate(EDIT, seed=2, cache_policy="off", **SETTINGS[family])
    np.testing.assert_allclose(hit.frames, full.frames, rtol=0, atol=1e-5)


def test_wan22_a14b_records_features_per_expert_and_reports_which_ran(engine_for, region):
    region(left_half(GRIDS["wan2.2-a14b"]))
    engine = engine_for("wan2.2-a14b", PlannerConfig(min_similarity=-1.0))
    source = engine.generate(PROMPT, seed=1, **SETTINGS["wan2.2-a14b"])
    # The boundary (0.875 of 1000 training steps) falls after the first of 4 steps (timesteps 1000, 858, 602, 9).
    assert source.report.experts == [0, 1, 1, 1]
    bank = engine.cache.load(source.report.request_id).features
    assert set(bank) == {FeatureKey(s, b, x, 1) for s in (1, 2, 3) for b in ("cond", "uncond") for x in "kv"}
    assert FeatureKey.parse("features/cond/3/k@1") == FeatureKey(3, "cond", "k", 1)  # how a store names them
    assert bank.steps_for(["cond", "uncond"], [0, 1, 1, 1]) == {1, 2, 3}
    assert bank.steps_for(["cond", "uncond"]) == set()  # no step's features are the high-noise expert's
    hit = engine.generate(EDIT, seed=2, **SETTINGS["wan2.2-a14b"])
    assert hit.report.plan == "crrr" and hit.report.experts == [0, 1, 1, 1]


@pytest.mark.parametrize("family", FALLBACK)
def test_joint_attention_families_compute_region_steps_in_full_and_say_so(family, engine_for, region):
    region(left_half(GRIDS[family]))
    engine = engine_for(family, PlannerConfig(min_similarity=-1.0))
    assert engine.hooks is None  # nothing recorded: no region step could use it
    engine.generate(PROMPT, seed=1, **SETTINGS[family])
    edit = engine.generate(EDIT, seed=2, **SETTINGS[family])
    r = edit.report
    assert (r.outcome, r.difference, r.plan) == ("miss", "local", "cccc")
    assert "joint" in r.stage2_fallback and "computed in full" in r.stage2_fallback
    assert r.miss_reason == r.stage2_fallback
    off = engine.generate(EDIT, seed=2, cache_policy="off", **SETTINGS[family])
    np.testing.assert_array_equal(edit.frames, off.frames)


def test_ltx_flops_are_what_torch_counts(engine_for, region, adapters):
    from .test_stage2 import transformer_flops_counted

    region(left_half(GRIDS["ltx-video"]))
    engine = engine_for("ltx-video", PlannerConfig(min_similarity=-1.0))
    engine.generate(PROMPT, seed=1, **SETTINGS["ltx-video"])
    transformer = adapters("ltx-video").transformer
    hit, per_call = transformer_flops_counted(
        transformer, lambda: engine.generate(EDIT, seed=2, **SETTINGS["ltx-video"])
    )
    r = hit.report
    assert r.plan == "crrr" and len(per_call) == 8
    assert sum(per_call[:2]) == pytest.approx(r.flops_full_step, rel=0.01)
    assert sum(per_call[2:4]) == pytest.approx(r.flops_region_step, rel=0.01)


def test_an_unknown_pipeline_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["generate", PROMPT, "--model", str(tmp_path), "--no-cache", "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "'StableDiffusionPipeline' pipelines are not supported by Chorus" in err and "Traceback" not in err
    assert "WanPipeline" in err and "HunyuanVideoPipeline" in err and "LTXPipeline" in err
    assert "CogVideoXPipeline" in err


def test_cogvideox_with_a_stochastic_scheduler_is_refused_by_name(tmp_path, capsys):
    from diffusers import CogVideoXDPMScheduler

    from .families import cogvideox

    pipe = cogvideox()
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    pipe.register_modules(scheduler=pipe.scheduler)
    pipe.save_pretrained(tmp_path)
    assert main(["generate", PROMPT, "--model", str(tmp_path), "--no-cache", "--out", str(tmp_path / "x.npy")]) == 2
    assert "CogVideoX with CogVideoXDPMScheduler is not supported" in capsys.readouterr().err
