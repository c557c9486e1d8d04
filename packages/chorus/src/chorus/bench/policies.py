"""The policies a trace is replayed under: what is reused across requests, and what within one.

| policy          | across requests (cache)                                          | within a request         |
|-----------------|------------------------------------------------------------------|--------------------------|
| `none`          | nothing                                                          | nothing                  |
| `exact`         | exact repeats only (same prompt, seed and settings)              | nothing                  |
| `nirvana`       | stage 1 only: NIRVANA's similarity table scaled to N steps       | nothing                  |
| `chorus-stage1` | stage 1 only: the same idea with a table calibrated for MiniLM   | nothing                  |
| `chorus-notgaa` | Chorus's plans with TGAA off (alpha = 1; ablation)               | nothing                  |
| `chorus`        | Chorus's plans (`chorus.planner.Planner`, `PlannerConfig()`)     | nothing                  |
| `fbc`           | nothing                                                          | First-Block-Cache        |
| `taylorseer`    | nothing                                                          | TaylorSeer               |
| `magcache`      | nothing                                                          | MagCache                 |
| `chorus+X`      | as `chorus`                                                      | X: fbc, taylorseer, ...  |
| `chorus+best`   | as `chorus`                                                      | the best of them (*)     |

Intra-request caches come from `diffusers.hooks`.
(*) of this run's intra-request policies, the fastest at an alignment within 2 points of `none`.

NIRVANA (NSDI'24) skips K of 50 steps at CLIP similarity > 0.95 -> 25, > 0.90 -> 20, > 0.85 -> 15, > 0.75 -> 10,
> 0.65 -> 5: its table as fractions of the schedule. It was set for CLIP text similarities; Chorus embeds with
MiniLM, under which paraphrases score lower, so `chorus-stage1` is the same stage-1-only reuse with thresholds for
MiniLM. `exact` is a plain response cache, the reuse any serving system has: what it gains is the part of every other
cache policy's speed-up that costs no quality.

Intra-request caches are set relative to the schedule (they do nothing on very short ones, which is the point the
paper makes about 4-step models): TaylorSeer computes the first ~10% of the steps (at least 1) and then every
`interval`-th step (lite mode: the output projection is predicted and the blocks skipped); First-Block-Cache skips the
remaining blocks when the first block's residual changed by less than `threshold`; MagCache skips by accumulated
magnitude-ratio error, with ratios measured on one calibration request.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..planner import MINILM_TABLE, NIRVANA_TABLE, Planner, PlannerConfig, StageOneConfig, StageOnePlanner

INTRA_NAMES = ("fbc", "taylorseer", "magcache")


@dataclass(frozen=True)
class Policy:
    name: str
    cache: bool = False  # reuse across requests (an empty in-memory cache at the start of the replay)
    planner: PlannerConfig | StageOneConfig | None = None
    intra: str | None = None  # one of INTRA_NAMES
    intra_options: dict = field(default_factory=dict)

    def make_planner(self) -> Planner | StageOnePlanner:
        if isinstance(self.planner, StageOneConfig):
            return StageOnePlanner(self.planner)
        return Planner(self.planner)

    def describe(self) -> dict:
        d = {"cache": self.cache, "intra": self.intra, "intra_options": self.intra_options}
        if self.cache:
            planner = self.make_planner()
            d["planner"] = {"kind": planner.kind, **vars(planner.config)}
        return d


def make_policy(name: str, planner: PlannerConfig | None = None) -> Policy:
    """A policy by name; `planner` overrides Chorus's defaults for the chorus policies (sweeps)."""
    chorus = planner or PlannerConfig()
    if name == "none":
        return Policy(name)
    if name == "exact":
        return Policy(name, cache=True, planner=StageOneConfig(table=()))
    if name == "nirvana":
        return Policy(name, cache=True, planner=StageOneConfig(NIRVANA_TABLE))
    if name == "chorus-stage1":
        return Policy(name, cache=True, planner=StageOneConfig(MINILM_TABLE))
    if name == "chorus-notgaa":
        return Policy(name, cache=True, planner=replace(chorus, alpha=1.0))
    if name == "chorus":
        return Policy(name, cache=True, planner=chorus)
    if name in INTRA_NAMES:
        return Policy(name, intra=name)
    if name.startswith("chorus+"):
        intra = name.removeprefix("chorus+")
        if intra in (*INTRA_NAMES, "best"):
            return Policy(name, cache=True, planner=chorus, intra=intra)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(known_policies())}")


def known_policies() -> list[str]:
    return [
        "none",
        "exact",
        "nirvana",
        "chorus-stage1",
        "chorus-notgaa",
        "chorus",
        *INTRA_NAMES,
        *(f"chorus+{n}" for n in (*INTRA_NAMES, "best")),
    ]


# ---- intra-request caches from diffusers.hooks ----------------------------------------------------------------

DEFAULT_INTRA_OPTIONS = {
    "fbc": {"threshold": 0.05},
    "taylorseer": {"interval": 3, "warmup_fraction": 0.1, "max_order": 1, "lite": True},
    "magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
}


def intra_cache_config(name: str, num_steps: int, options: dict | None = None, calibrate: Callable | None = None):
    """A `diffusers.hooks` cache config for a schedule of `num_steps`; `calibrate(num_steps)` gives MagCache's
    per-step magnitude ratios."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    o = {**DEFAULT_INTRA_OPTIONS[name], **(options or {})}
    if name == "fbc":
        return FirstBlockCacheConfig(threshold=o["threshold"])
    if name == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=o["interval"],
            disable_cache_before_step=max(1, round(o["warmup_fraction"] * num_steps)),
            disable_cache_after_step=num_steps - 1,  # the last step is always computed
            max_order=o["max_order"],
            taylor_factors_dtype=torch.float32,
            use_lite_mode=o["lite"],  # predict the model output from its Taylor series, skipping every block
        )
    if name == "magcache":
        if calibrate is None:
            raise ValueError("magcache needs calibrated magnitude ratios")
        return MagCacheConfig(
            threshold=o["threshold"],
            max_skip_steps=o["max_skip_steps"],
            retention_ratio=o["retention_ratio"],
            num_inference_steps=num_steps,
            mag_ratios=calibrate(num_steps),
        )
    raise ValueError(f"unknown intra-request cache {name!r}")


def magnitude_ratios(adapter, run_request: Callable[[], None], num_steps: int) -> list[float]:
    """MagCache's calibration, measured with forward hooks: per step, the mean over tokens of the norm of the block
    stack's residual (last block's output minus first block's input) over the previous step's (1.0 at step 0).
    `run_request()` runs one plain request of `num_steps` steps through the adapter (under classifier-free guidance
    the conditional pass is used)."""
    blocks = adapter.transformer.blocks
    seen: dict[str, torch.Tensor] = {}
    residuals: list[torch.Tensor] = []

    def first(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach().float()

    def last(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        residuals.append(out.detach().float() - seen["in"])

    handles = [
        blocks[0].register_forward_pre_hook(first, with_kwargs=True),
        blocks[-1].register_forward_hook(last, with_kwargs=True),
    ]
    try:
        run_request()
    finally:
        for h in handles:
            h.remove()
    residuals = residuals[:: max(1, len(residuals) // num_steps)][:num_steps]
    ratios = [1.0]
    for prev, cur in itertools.pairwise(residuals):
        ratios.append(float((cur.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)).mean()))
    return [float(np.clip(r, 0.0, 10.0)) for r in ratios]
