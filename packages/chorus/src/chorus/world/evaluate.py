"""Measure the built-in model (or any model of this world) with the analyzer, through the engine.

    python -m chorus.world.evaluate --n 200 --steps 4 50 [--model builtin] [--out report.json] [--sheet s.png]

Generates one video per held-out prompt (`prompts.heldout_prompts(n)`: held-out attribute combinations, and
held-out templates and synonyms half of the time each) with seed = its index, through `ChorusEngine` with no
cache, so the numbers are those of the plain sampler. Per attribute it reports the share of the prompt's asks
that the analyzer finds in the video (background, object count, and per object colour, shape, motion, size when
named), the mean alignment score, and seed diversity: for `--pairs` prompts a second seed, and how often the two
videos differ visibly (objects start at least 2 pixels apart or differ in size).

`--layout-probe` reports how much of the noise-tied layout the model has learned, `--wording-probe` how the text
encoder places each held-out synonym relative to the training synonyms, `--wording-ablation` what each held-out part
of a wording (templates, or one attribute's synonyms) costs the model (see the model card).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import analyzer, prompts, scenes

REQUIRED = ("colour", "motion", "shape", "background", "count")


def make_engine(model: str = "builtin"):
    from chorus.engine import ChorusEngine
    from chorus.models import load_adapter

    return ChorusEngine(load_adapter(model))


def generate(engine, prompt: str, seed: int, steps: int) -> np.ndarray:
    return engine.generate(prompt, seed=seed, num_inference_steps=steps, cache_policy="off").frames


def _score(engine, items, steps: int, progress: bool = True, desc: str = ""):
    """Generate each (spec, prompt) with seed = its index and analyse the video; yields (index, spec, text, frames,
    analysis, alignment score) one prompt at a time."""
    for i, (spec, text) in enumerate(tqdm(items, desc=desc or f"{steps}-step", disable=not progress)):
        frames = generate(engine, text, i, steps)
        result = analyzer.analyze(frames)
        yield i, spec, text, frames, result, analyzer.alignment(spec, result)


def evaluate(engine, n: int = 200, steps: int = 4, pairs: int = 20, seed: int = 1234, progress: bool = True) -> dict:
    items = prompts.heldout_prompts(n, seed)
    hits: dict[str, list[bool]] = {}
    scores, diverse, pixel_diff = [], [], []
    heldout_words = {w for ws in prompts.vocabulary("heldout").values() for w in ws}
    by_wording: dict[str, list[float]] = {"held-out words": [], "training words only": []}
    t0 = time.perf_counter()
    for i, spec, text, frames, result, score in _score(engine, items, steps, progress):
        for attr, values in analyzer.attribute_hits(spec, result).items():
            hits.setdefault(attr, []).extend(values)
        scores.append(score)
        padded = " " + " ".join(text.lower().replace(",", " ").replace(":", " ").split()) + " "
        uses_heldout = any(f" {w} " in padded for w in heldout_words)
        by_wording["held-out words" if uses_heldout else "training words only"].append(score)
        if i < pairs:
            other = generate(engine, text, i + 100_000, steps)
            diverse.append(analyzer.visibly_different(result, analyzer.analyze(other)))
            pixel_diff.append(float(np.abs(frames - other).mean()))
    seconds = time.perf_counter() - t0
    accuracy = {k: float(np.mean(v)) for k, v in hits.items() if v}
    return {
        "steps": steps,
        "generations": n,
        "accuracy": accuracy,
        "asks": {k: len(v) for k, v in hits.items()},
        "meets_90": all(accuracy[k] >= 0.9 for k in REQUIRED),
        "alignment": float(np.mean(scores)),
        "alignment_by_wording": {k: (float(np.mean(v)) if v else None, len(v)) for k, v in by_wording.items()},
        "seed_pairs": len(diverse),
        "seed_pairs_visibly_different": float(np.mean(diverse)) if diverse else None,
        "seed_pairs_mean_abs_pixel_diff": float(np.mean(pixel_diff)) if pixel_diff else None,
        "seconds": round(seconds, 1),
        "seconds_per_generation": round(seconds / (n + len(diverse)), 3),
    }


def wording_ablation(engine, n: int = 100, steps: int = 4, seed: int = 1234, progress: bool = True) -> dict:
    """What each held-out part of a wording costs: the same `n` held-out attribute combinations, worded with
    training wordings only, then with one part (templates, or one attribute's synonyms) always held out, then with
    every part held out. Per condition the mean alignment and the per-attribute accuracy."""
    conditions: dict[str, tuple[str, ...]] = {"training wordings": ()}
    conditions |= {f"held-out {part}": (part,) for part in prompts.WORDING_PARTS}
    conditions["all held out"] = prompts.WORDING_PARTS
    # The specs come from their own generator: wording draws differ between conditions and must not change them.
    spec_rng = np.random.default_rng(seed)
    specs = [prompts.sample_spec(spec_rng, "heldout") for _ in range(n)]
    out: dict[str, dict] = {}
    for name, parts in conditions.items():
        word_rng = np.random.default_rng(seed + 1)
        items = [(spec, prompts.realize(word_rng, spec, "heldout", p_word=1.0, parts=parts)) for spec in specs]
        hits: dict[str, list[bool]] = {}
        scores = []
        for _, spec, _, _, result, score in _score(engine, items, steps, progress, desc=name):
            for attr, values in analyzer.attribute_hits(spec, result).items():
                hits.setdefault(attr, []).extend(values)
            scores.append(score)
        out[name] = {
            "alignment": float(np.mean(scores)),
            "accuracy": {k: float(np.mean(v)) for k, v in hits.items() if v},
        }
    return {"steps": steps, "prompts": n, "conditions": out}


def format_ablation(report: dict) -> str:
    attrs = [*REQUIRED, "size"]
    head = f"| wording ({report['prompts']} prompts, {report['steps']} steps) | alignment | "
    lines = [head + " | ".join(attrs) + " |"]
    lines.append("|" + "---|" * (len(attrs) + 2))
    for name, r in report["conditions"].items():
        acc = " | ".join(f"{100 * r['accuracy'].get(a, float('nan')):.0f}%" for a in attrs)
        lines.append(f"| {name} | {r['alignment']:.3f} | {acc} |")
    return "\n".join(lines)


@torch.no_grad()
def layout_probe(adapter, n: int = 48, sigmas=(1.0, 0.8, 0.5, 0.2), seed: int = 11) -> dict[str, dict[str, float]]:
    """How much of the noise-tied layout (`scenes.noise_layout`) an x0-predicting model has learned: on `n` training
    prompts, per sigma, the squared error of its x0 prediction on the object pixels, next to that of guessing the
    background there (what a model that ignores the layout would do)."""
    rng = np.random.default_rng(seed)
    items = [prompts.training_prompt(rng) for _ in range(n)]
    noises, clips = [], []
    for spec, _ in items:
        noise = rng.standard_normal((3, scenes.NUM_FRAMES, scenes.HEIGHT, scenes.WIDTH), dtype=np.float32)
        while (scene := spec.noise_layout(noise)) is None:
            noise = rng.standard_normal(noise.shape, dtype=np.float32)
        noises.append(noise)
        clips.append(scenes.render(scene))
    noise = torch.from_numpy(np.stack(noises))
    x0 = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3) * 2 - 1
    text = adapter.encode_texts([t for _, t in items], adapter.defaults.max_sequence_length)
    background = torch.stack([torch.tensor(scenes.BACKGROUNDS[s.background]) / 255 * 2 - 1 for s, _ in items])
    background = background.float().view(n, 3, 1, 1, 1).expand_as(x0)
    on_object = ((x0 - background).abs().sum(1, keepdim=True) > 0.1).expand_as(x0)
    out = {}
    for sigma in sigmas:
        xt = (1 - sigma) * x0 + sigma * noise
        timestep = torch.full((n,), sigma * 1000.0)
        pred = adapter.transformer(hidden_states=xt, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
            0
        ]
        out[str(sigma)] = {
            "object_pixel_mse": float(((pred - x0) ** 2)[on_object].mean()),
            "background_guess_mse": float(((background - x0) ** 2)[on_object].mean()),
        }
    return out


# One carrier sentence per attribute ({} is the word); the other attributes are training words.
WORDING_CARRIERS = {
    "colour": (prompts.COLOUR_WORDS, "a {} circle moving left on a white background"),
    "shape": (prompts.SHAPE_WORDS, "a red {} moving left on a white background"),
    "motion": (prompts.MOTION_WORDS, "a red circle {} on a white background"),
    "background": (prompts.BACKGROUND_WORDS, "a red circle moving left on a {} background"),
    "size": (prompts.SIZE_WORDS, "a {} red circle moving left on a white background"),
}


@torch.no_grad()
def wording_probe(adapter) -> dict:
    """How far the text encoder alone places each held-out synonym next to a training synonym of the same value.

    Each word of an attribute is put in that attribute's carrier sentence and encoded by the model's text encoder.
    For every held-out word, the nearest training word (cosine) by (a) the mean of the word's own token vectors, the
    vectors the DiT reads, and (b) the sentence's mean-pooled, normalised vector (the sentence-transformers
    embedding). A held-out word nearest to another value's word is one that a model generalising by proximity in
    that space gets wrong."""
    out: dict = {"words": {}, "token_correct": 0, "sentence_correct": 0, "heldout_words": 0}
    for attribute, (table, carrier) in WORDING_CARRIERS.items():
        words = [(w, v, w in heldout) for v, (train, heldout) in table.items() for w in (*train, *heldout)]
        sentences = [carrier.format(w) for w, _, _ in words]
        enc = adapter.tokenizer(sentences, padding=True, return_offsets_mapping=True, return_tensors="pt")
        hidden = adapter.text_encoder(enc.input_ids, enc.attention_mask).last_hidden_state.float()
        mask = enc.attention_mask.unsqueeze(-1).float()
        sentence = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        token = []
        start = carrier.index("{}")
        for row, (w, _, _) in enumerate(words):
            span = [
                i for i, (a, b) in enumerate(enc.offset_mapping[row].tolist()) if b > a and start <= a < start + len(w)
            ]
            token.append(hidden[row, span].mean(0))
        token = torch.nn.functional.normalize(torch.stack(token), dim=-1)
        train_rows = [i for i, (_, _, held) in enumerate(words) if not held]
        for i, (w, value, held) in enumerate(words):
            if not held:
                continue
            entry = {"value": value}
            same = torch.tensor([words[j][1] == value for j in train_rows])
            for kind, vecs in (("token", token), ("sentence", sentence)):
                sims = vecs[train_rows] @ vecs[i]
                j = train_rows[int(sims.argmax())]
                entry[f"{kind}_nearest"] = {
                    "word": words[j][0],
                    "value": words[j][1],
                    "cosine": float(sims.max()),
                    # nearest training word of its own value minus nearest of another value: < 0 is a miss
                    "margin": float(sims[same].max() - sims[~same].max()),
                }
                out[f"{kind}_correct"] += words[j][1] == value
            out["words"][f"{attribute}: {w}"] = entry
            out["heldout_words"] += 1
    return out


def contact_sheet(engine, path: str | Path, steps: int = 4, rows: int = 6, seeds: int = 3, seed: int = 1234) -> Path:
    """A PNG: per row one held-out prompt, per seed its first, middle and last frame (4x upscaled)."""
    from PIL import Image

    items = prompts.heldout_prompts(rows, seed)
    strips = []
    for i, (_, text) in enumerate(items):
        row = []
        for s in range(seeds):
            frames = generate(engine, text, i + 1000 * s, steps)
            f = frames.shape[0]
            row.append(np.concatenate([frames[0], frames[f // 2], frames[-1], np.ones_like(frames[0][:, :2])], 1))
        strips.append(np.concatenate(row, 1))
        strips.append(np.ones_like(strips[-1][:2]))
    sheet = (np.concatenate(strips, 0) * 255).round().astype(np.uint8)
    img = Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path


def format_report(reports: list[dict]) -> str:
    attrs = [*REQUIRED, "size"]
    lines = ["| steps | " + " | ".join(attrs) + " | alignment | seeds visibly different | s/generation |"]
    lines.append("|" + "---|" * (len(attrs) + 4))
    for r in reports:
        acc = " | ".join(f"{100 * r['accuracy'].get(a, float('nan')):.1f}%" for a in attrs)
        div = r["seed_pairs_visibly_different"]
        lines.append(
            f"| {r['steps']} | {acc} | {r['alignment']:.3f} | "
            f"{'-' if div is None else f'{100 * div:.0f}%'} ({r['seed_pairs']} pairs) | {r['seconds_per_generation']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m chorus.world.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin", help="'builtin' or a model directory")
    p.add_argument("--n", type=int, default=200, help="held-out prompts (one generation each)")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 50])
    p.add_argument("--pairs", type=int, default=20, help="prompts generated with a second seed")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--sheet", default=None, help="write a PNG contact sheet of 4-step generations here")
    p.add_argument("--layout-probe", action="store_true", help="only report how much of the noise-tied layout it knows")
    p.add_argument(
        "--wording-probe", action="store_true", help="only report how the text encoder places the held-out synonyms"
    )
    p.add_argument(
        "--wording-ablation",
        action="store_true",
        help="only report what each held-out wording part costs (--n prompts per condition, first of --steps)",
    )
    a = p.parse_args(argv)
    engine = make_engine(a.model)
    if a.layout_probe:
        print(json.dumps(layout_probe(engine.adapter), indent=2))
        return
    if a.wording_probe:
        print(json.dumps(wording_probe(engine.adapter), indent=2))
        return
    if a.wording_ablation:
        report = wording_ablation(engine, a.n, a.steps[0])
        print(json.dumps(report, indent=2))
        print(format_ablation(report))
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    reports = [evaluate(engine, a.n, s, a.pairs) for s in a.steps]
    print(json.dumps(reports, indent=2))
    print(format_report(reports))
    if a.out:
        Path(a.out).write_text(json.dumps(reports, indent=2) + "\n")
    if a.sheet:
        print(f"contact sheet: {contact_sheet(engine, a.sheet)}")


if __name__ == "__main__":
    main()
