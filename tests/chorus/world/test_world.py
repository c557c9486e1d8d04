"""The built-in world: scenes render, prompts cover every attribute and keep held-out parts out of training,
and the analyzer reads rendered clips right at least 99% of the time per attribute."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from chorus.world import analyzer, prompts, scenes


def test_render_shape_range_and_determinism():
    rng = np.random.default_rng(0)
    spec = prompts.sample_spec(rng)
    scene = spec.layout(rng)
    a, b = scenes.render(scene), scenes.render(scene)
    assert a.shape == (scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(a, b)


def test_layout_keeps_objects_inside_and_apart():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = prompts.sample_spec(rng, p_two=1.0).layout(rng)
        for obj in scene.objects:
            for f in range(scene.num_frames):
                x0, y0, x1, y1 = obj.box(f)
                assert x0 >= 0 and y0 >= 0 and x1 <= scene.width and y1 <= scene.height
        a, b = scene.objects
        assert a.colour != b.colour
        assert scenes._boxes_apart(a, b, scene.num_frames)


def test_noise_layout_is_a_function_of_the_noise_and_follows_its_box_sums():
    rng = np.random.default_rng(2)
    shape = (3, scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH)
    positions, placed, scores = set(), 0, []
    for _ in range(200):
        spec = prompts.sample_spec(rng, p_two=0.5)
        noise = rng.standard_normal(shape, dtype=np.float32)
        scene = spec.noise_layout(noise)
        if scene is None:  # two objects that cannot be placed apart: rare, and training redraws the noise
            continue
        placed += 1
        assert scene == spec.noise_layout(noise.copy())
        first = scene.objects[0]
        positions.add((first.x, first.y, first.size))
        for obj in scene.objects:
            for f in range(scene.num_frames):
                x0, y0, x1, y1 = obj.box(f)
                assert x0 >= 0 and y0 >= 0 and x1 <= scene.width and y1 <= scene.height
        assert all(scenes._boxes_apart(a, b, scene.num_frames) for a, b in itertools.pairwise(scene.objects))
        # the first object starts on the 4-pixel lattice, at the in-frame cell where channel 0 of frames 0-1 sums
        # highest
        assert first.x % 4 == 0 and first.y % 4 == 0
        cells = noise[0, :2].sum(0).reshape(8, 4, 8, 4).sum((1, 3))
        xlo, xhi = scenes._start_range(first.motion, first.size, scene.width, 0, scene.num_frames)
        ylo, yhi = scenes._start_range(first.motion, first.size, scene.height, 1, scene.num_frames)
        valid = cells[-(-ylo // 4) : yhi // 4 + 1, -(-xlo // 4) : xhi // 4 + 1]
        assert cells[first.y // 4, first.x // 4] == valid.max()
        scores.append(analyzer.alignment(spec, scenes.render(scene)))
    assert np.mean(scores) >= 0.99  # the analyzer reads noise-placed scenes as well as randomly placed ones
    assert placed >= 180 and len(positions) >= 60  # different noise, different layouts


def test_motion_moves_the_object():
    obj = scenes.SceneObject("square", "red", "right", 8, 2, 10)
    video = scenes.render(scenes.Scene("white", (obj,)))
    red = np.array(scenes.COLOURS["red"]) / 255
    cols = [np.nonzero(np.all(np.isclose(v, red, atol=1e-3), -1))[1] for v in video]
    assert cols[0].min() == 2 and cols[-1].min() == 2 + scenes.SPEED * (scenes.NUM_FRAMES - 1)


@pytest.mark.slow  # thousands of prompts or clips
def test_prompts_cover_every_attribute_value():
    rng = np.random.default_rng(2)
    seen: dict[str, set] = {k: set() for k in ("colour", "shape", "motion", "background", "count", "size")}
    for split in ("train", "heldout"):
        for _ in range(1500):
            spec = prompts.sample_spec(rng, split)
            seen["background"].add(spec.background)
            seen["count"].add(len(spec.objects))
            for o in spec.objects:
                seen["colour"].add(o.colour)
                seen["shape"].add(o.shape)
                seen["motion"].add(o.motion)
                seen["size"].add(o.size)
    assert seen["colour"] == set(scenes.COLOURS) and len(seen["colour"]) >= 6
    assert seen["shape"] == {"circle", "square", "triangle"}
    assert seen["motion"] == {"left", "right", "up", "down", "still"}
    assert seen["background"] == set(scenes.BACKGROUNDS)
    assert seen["count"] == {1, 2}
    assert seen["size"] == {None, "small", "large"}


def _words(text: str) -> str:
    return " " + " ".join(text.lower().replace(",", " ").replace(":", " ").split()) + " "


@pytest.mark.slow  # thousands of prompts or clips
def test_training_prompts_never_use_heldout_parts():
    rng = np.random.default_rng(3)
    heldout_words = {w for words in prompts.vocabulary("heldout").values() for w in words}
    heldout_templates = [t.split("{")[0].strip() for t in prompts.SCENE_TEMPLATES[1] if t.split("{")[0].strip()]
    heldout_templates += ["in front of", "canvas"]
    for _ in range(3000):
        spec, text = prompts.training_prompt(rng)
        assert not prompts.is_heldout_spec(spec)
        assert prompts.parse(text) == spec
        padded = _words(text)
        for w in heldout_words:
            assert f" {w} " not in padded, (w, text)
        for t in heldout_templates:
            assert t not in text.lower(), (t, text)
        assert " in " not in padded or "in front" in padded  # the held-out object form "a circle in red"


def test_heldout_prompts_are_heldout_and_parse():
    items = prompts.heldout_prompts(400)
    assert all(prompts.is_heldout_spec(spec) for spec, _ in items)
    assert all(prompts.parse(text) == spec for spec, text in items)
    heldout_words = {w for words in prompts.vocabulary("heldout").values() for w in words}
    with_word = sum(any(f" {w} " in _words(text) for w in heldout_words) for _, text in items)
    assert with_word > 0.8 * len(items)
    assert prompts.heldout_prompts(50) == prompts.heldout_prompts(50)  # a fixed set


def test_realize_holds_out_only_the_parts_asked_for():
    vocab_heldout = prompts.vocabulary("heldout")
    rng = np.random.default_rng(5)
    for part in prompts.WORDING_PARTS:
        seen = set()
        for _ in range(200):
            spec = prompts.sample_spec(rng, "heldout")
            text = prompts.realize(rng, spec, "heldout", p_word=1.0, parts=(part,))
            assert prompts.parse(text) == spec
            padded = _words(text)
            for attribute, words in vocab_heldout.items():
                used = {w for w in words if f" {w} " in padded}
                assert attribute == part or not used, (part, text)
                seen |= used
            held_template = any(t.split("{")[0].strip() in text.lower() for t in ("footage of", "on a plain"))
            assert held_template == (part == "templates"), (part, text)  # p_word=1: always, when asked
        if part not in ("templates", "size"):  # sizes are named in only some prompts, templates are not words
            assert seen == vocab_heldout[part], part
    with pytest.raises(ValueError, match="parts: unknown wording parts \\['colours'\\]"):
        prompts.realize(rng, spec, "heldout", parts=("colours",))


def test_paraphrases_parse_to_the_same_spec():
    a = prompts.parse("a crimson disc drifting leftward on a snow-white background")
    b = prompts.parse("a red circle moving left on a white background")
    assert a == b == prompts.PromptSpec("white", (prompts.ObjectPrompt("circle", "red", "left"),))
    two = prompts.parse("a video of a big blue box rising and a tiny lemon wedge at rest on a dark background")
    assert two == prompts.PromptSpec(
        "black",
        (
            prompts.ObjectPrompt("square", "blue", "up", "large"),
            prompts.ObjectPrompt("triangle", "yellow", "still", "small"),
        ),
    )
    assert prompts.parse("a cat playing piano") is None


@pytest.mark.slow  # thousands of prompts or clips
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_analyzer_is_right_on_rendered_clips(split):
    rng = np.random.default_rng(4 if split == "train" else 5)
    right: dict[str, list[bool]] = {}
    for _ in range(400):
        spec = prompts.sample_spec(rng, split)
        analysis = analyzer.analyze(scenes.render(spec.layout(rng)))
        for attr, hits in analyzer.attribute_hits(spec, analysis).items():
            right.setdefault(attr, []).extend(hits)
    for attr in ("colour", "shape", "motion", "background", "count", "size"):
        assert len(right[attr]) >= 50
        assert np.mean(right[attr]) >= 0.99, (attr, np.mean(right[attr]))


def test_analyzer_reports_object_details_and_alignment():
    obj = scenes.SceneObject("triangle", "orange", "down", 11, 5, 3)
    video = scenes.render(scenes.Scene("gray", (obj,)))
    result = analyzer.analyze((video * 255).astype(np.uint8))
    assert result.background == "gray" and result.count == 1
    det = result.objects[0]
    assert (det.colour, det.shape, det.motion, det.size, det.size_word) == ("orange", "triangle", "down", 11, "large")
    assert det.displacement[1] == pytest.approx(scenes.SPEED * (scenes.NUM_FRAMES - 1))
    assert analyzer.alignment("a large orange triangle falling on a grey background", video) == 1.0
    # wrong motion and background: 3 of 5 attributes (background, count, colour, shape, motion) hold
    assert analyzer.alignment("an orange wedge moving up on a black background", video) == pytest.approx(3 / 5)
    blank = np.full_like(video, 245 / 255)
    assert analyzer.analyze(blank).count == 0
    assert analyzer.alignment("a red ball at rest on a white background", blank) == pytest.approx(1 / 5)
    with pytest.raises(ValueError):
        analyzer.alignment("a cat", video)
