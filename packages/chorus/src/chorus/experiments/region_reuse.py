"""Does stage 2 (region reuse with TGAA) keep an edited attribute right, and at what cost?

    python -m chorus.experiments.region_reuse --steps 4 --pairs 24 --out out/stage2

For pairs of prompts that differ in one object's colour ("a red circle moving left on a white background" ->
"a blue circle moving left on a white background"), the target is generated as a hit on the source under four arms
that reuse the same source, each from its own empty cache:

- `stage1@k2`: stage-1-only reuse as deep as Chorus's stage 2 reaches (skip k2 steps, compute the rest);
- `region`: stage 1 to k1, region-restricted stage 2 to k2 without amplification (alpha = 1);
- `region+tgaa`: the same with TGAA (alpha from `--alpha`);
- `stage1@k1`: stage-1-only reuse to k1, stage 2 computed in full (the quality reference for stage 2's cost).

Reported per arm: how often the analyzer finds the target colour, mean alignment, the mask fraction, and the
transformer FLOPs of the hit relative to a full generation. Writes `region_reuse_<steps>.json` and a PNG figure.

    python -m chorus.experiments.region_reuse --steps 4 --pairs 12 --mask-quality

instead measures the region mask itself against where the source's object really is (its non-background pixels,
as latent tokens), for a few mask settings: mask fraction, recall of the object's tokens, and IoU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chorus.attention import query_name, transformer_flops
from chorus.cache import MemoryStore, RequestCache
from chorus.embed import SentenceTransformerEmbedder
from chorus.engine import ChorusEngine
from chorus.models import load_adapter
from chorus.planner import Planner, PlannerConfig
from chorus.regions import MaskConfig, prompt_diff, region_mask
from chorus.stage2 import Stage2Config
from chorus.world import analyzer, prompts

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("white", "black", "gray")
MOTION_TEXT = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down"}


def colour_edit_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(source prompt, target prompt, target colour), every source/target colour pair equally often."""
    rng = np.random.default_rng(seed)
    colour_pairs = [p for p in itertools.permutations(COLOURS, 2)]
    rng.shuffle(colour_pairs)
    pairs = []
    for i in range(n):
        src, tgt = colour_pairs[i % len(colour_pairs)]
        shape, motion, bg = rng.choice(SHAPES), rng.choice(MOTIONS), rng.choice(BACKGROUNDS)
        words = f"{shape} {MOTION_TEXT[motion]} on a {bg} background"
        pairs.append((f"{_article(src)} {src} {words}", f"{_article(tgt)} {tgt} {words}", tgt))
    return pairs


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def arms(num_steps: int, k1: int, k2: int, alpha: float) -> dict[str, tuple[PlannerConfig, Stage2Config]]:
    def plan(a: int, b: int) -> PlannerConfig:
        return PlannerConfig(
            stage1=((0.0, a / num_steps),), stage2=((0.0, b / num_steps),), full_stage2_mask=1.0, no_stage2_mask=1.0
        )

    return {
        "stage1@k2": (plan(k2, k2), Stage2Config(enabled=False)),
        "region": (plan(k1, k2), Stage2Config(alpha=1.0)),
        "region+tgaa": (plan(k1, k2), Stage2Config(alpha=alpha)),
        "stage1@k1": (plan(k1, k1), Stage2Config(enabled=False)),
    }


def hit_flops(report, transformer, tokens: int, text_tokens: int) -> float:
    """Transformer FLOPs of the computed steps, as a fraction of a full generation's."""
    full = transformer_flops(transformer, tokens, text_tokens)
    restricted = len(report.stage2_restricted_steps)
    spent = (report.steps_computed - restricted) * full + restricted * (report.flops_stage2_step or full)
    return spent / (report.num_steps * full)


def run(model: str, steps: int, k1: int, k2: int, alpha: float, n: int, seed: int) -> dict:
    adapter = load_adapter(model)
    embedder = SentenceTransformerEmbedder()
    d = adapter.defaults
    shape = adapter.latent_shape(d.height, d.width, d.num_frames)
    pt, ph, pw = adapter.patch_size
    tokens = shape[2] // pt * shape[3] // ph * shape[4] // pw
    pairs = colour_edit_pairs(n, seed)
    results = {}
    for name, (planner, stage2) in arms(steps, k1, k2, alpha).items():
        colour_ok, aligned, fractions, flops = [], [], [], []
        for i, (source, target, colour) in enumerate(tqdm(pairs, desc=name)):
            engine = ChorusEngine(
                adapter, RequestCache(MemoryStore(1 << 30), embedder.dim), embedder, Planner(planner), stage2=stage2
            )
            try:
                engine.generate(source, seed=seed + i, num_inference_steps=steps)
                hit = engine.generate(target, seed=seed + i, num_inference_steps=steps)
            finally:
                engine.close()
            assert hit.report.outcome == "hit", hit.report
            analysis = analyzer.analyze(hit.frames)
            colour_ok.append(analysis.find(colour) is not None)
            aligned.append(analyzer.alignment(prompts.parse(target), analysis))
            fractions.append(hit.report.mask_fraction if hit.report.mask_fraction is not None else math.nan)
            flops.append(hit_flops(hit.report, adapter.transformer, tokens, d.max_sequence_length))
        results[name] = {
            "colour_correct": float(np.mean(colour_ok)),
            "alignment": float(np.mean(aligned)),
            "mask_fraction": float(np.nanmean(fractions)) if not np.isnan(fractions).all() else None,
            "flops_vs_full_generation": float(np.mean(flops)),
        }
    return {
        "model": model,
        "steps": steps,
        "k1": k1,
        "k2": k2,
        "alpha": alpha,
        "pairs": n,
        "seed": seed,
        "arms": results,
    }


MASK_SETTINGS = {
    "quarter of the maps, dilate 1 (default)": Stage2Config().mask,
    "quarter of the maps, no dilation": MaskConfig(top_fraction=0.25, dilate=0, temporal_window=0),
    "half of the maps, no dilation": MaskConfig(top_fraction=0.5, dilate=0, temporal_window=0),
    "half of the maps, dilate 1, frames +-1": MaskConfig(top_fraction=0.5, dilate=1, temporal_window=1),
}


def mask_quality(model: str, steps: int, k1: int, n: int, seed: int) -> dict:
    """Region masks of colour edits against the source object's tokens, per mask setting."""
    adapter = load_adapter(model)
    embedder = SentenceTransformerEmbedder()
    planner = PlannerConfig(stage1=((0.0, k1 / steps),), stage2=((0.0, 1.0),), full_stage2_mask=1.0, no_stage2_mask=1.0)
    engine = ChorusEngine(adapter, RequestCache(MemoryStore(1 << 32), embedder.dim), embedder, Planner(planner))
    controller, layers = engine.region_reuse.controller, len(adapter.transformer.blocks)
    max_len = adapter.defaults.max_sequence_length
    scores: dict[str, list[tuple[float, float, float]]] = {name: [] for name in MASK_SETTINGS}
    try:
        for i, (source, target, _) in enumerate(tqdm(colour_edit_pairs(n, seed), desc="masks")):
            miss = engine.generate(source, seed=seed + i, num_inference_steps=steps)
            entry = engine.cache.load(miss.report.request_id)
            frames = miss.frames  # [F, H, W, 3]
            background = np.median(frames.reshape(-1, 3), 0)
            obj = torch.from_numpy(np.abs(frames - background).sum(-1) > 0.3)  # [F, H, W]
            pt, ph, pw = adapter.patch_size
            f, h, w = obj.shape
            obj = obj.view(f // pt, pt, h // ph, ph, w // pw, pw).any(5).any(3).any(1)
            if not obj.any():
                continue  # the source drew no object: nothing to localise
            diff = prompt_diff(adapter.tokenizer, source, target, max_len)
            queries = [entry.extras[query_name(k1, layer)][0] for layer in range(layers)]
            keys = {
                p: [k[0] for k in controller.text_keys(adapter.encode_prompt(p, None, 1.0, max_len).cond)]
                for p in (source, target)
            }
            for name, config in MASK_SETTINGS.items():
                mask = region_mask(tuple(obj.shape), diff, queries, keys[target], keys[source], config)
                inter, union = (mask & obj).sum().item(), (mask | obj).sum().item()
                scores[name].append((mask.float().mean().item(), inter / obj.sum().item(), inter / union))
    finally:
        engine.close()
    return {
        name: dict(zip(("mask_fraction", "object_recall", "iou"), np.mean(v, 0).round(3).tolist(), strict=True))
        | {"pairs": len(v)}
        for name, v in scores.items()
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"])
    colour = [100 * result["arms"][a]["colour_correct"] for a in names]
    cost = [100 * result["arms"][a]["flops_vs_full_generation"] for a in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, colour, color="#4c72b0")
    axes[0].set_ylabel("target colour correct (%)")
    axes[0].set_ylim(0, 100)
    axes[1].bar(names, cost, color="#dd8452")
    axes[1].set_ylabel("transformer FLOPs of the hit (% of a full run)")
    for ax, values in zip(axes, (colour, cost), strict=True):
        for x, v in enumerate(values):
            ax.text(x, v + 1, f"{v:.0f}", ha="center")
        ax.tick_params(axis="x", rotation=15)
    fig.suptitle(
        f"colour edits, {result['steps']} steps, k1={result['k1']}, k2={result['k2']}, alpha={result['alpha']}, "
        f"{result['pairs']} pairs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--k1", type=int, default=None, help="default: a quarter of the steps")
    parser.add_argument("--k2", type=int, default=None, help="default: three quarters of the steps")
    parser.add_argument("--alpha", type=float, default=Stage2Config().alpha)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/stage2"))
    parser.add_argument("--mask-quality", action="store_true", help="measure the region masks only (see above)")
    args = parser.parse_args(argv)
    k1 = args.k1 if args.k1 is not None else max(1, round(args.steps / 4))
    k2 = args.k2 if args.k2 is not None else max(k1 + 1, round(3 * args.steps / 4))
    if args.mask_quality:
        quality = mask_quality(args.model, args.steps, k1, args.pairs, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"mask_quality_{args.steps}.json").write_text(json.dumps(quality, indent=2))
        for name, q in quality.items():
            print(
                f"{name:>40}: mask {q['mask_fraction']:.2f}  object recall {q['object_recall']:.2f}  IoU {q['iou']:.2f}"
            )
        return
    result = run(args.model, args.steps, k1, k2, args.alpha, args.pairs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"region_reuse_{args.steps}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    for name, r in result["arms"].items():
        print(
            f"{name:>12}: colour {100 * r['colour_correct']:5.1f}%  alignment {r['alignment']:.3f}  "
            f"mask {r['mask_fraction'] if r['mask_fraction'] is None else round(r['mask_fraction'], 3)}  "
            f"FLOPs {100 * r['flops_vs_full_generation']:5.1f}% of a full run"
        )


if __name__ == "__main__":
    main()
