"""Plans: which denoising steps a request computes, which it takes from a cached source, and which it recomputes
only in a region.

A plan gives each of the N steps an action:

- `compute`: the whole latent goes through the transformer;
- `region`: only the region's tokens do, attending to the source's keys and values for the rest; outside the
  region the latent follows the source's trajectory exactly (stage 2);
- `reuse`: nothing is computed; the latent after the step is the source's (stage 1).

`Planner` is Chorus's: it computes the request's first step from its own noise (nothing is assumed about the
prompt), then compares the model's clean-video prediction of that step with each candidate source's at the same step.
Where the two agree the model draws the same thing, and the source's later work is reused; where they differ is the
region. The share of differing tokens is the kind of difference: `none` (no token differs: every later step is the
source's), `local` (region steps, with TGAA on the tokens of the new words), `global` (above `max_region`: computed in
full, nothing reused). The last `final_compute` share of the steps is computed in full (stage 3) on every hit.

`StageOnePlanner` is the stage-1-only baseline (NIRVANA's idea): the best match's embedding similarity alone says
how many leading steps to take from the source, through a table of (similarity, fraction of the steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

ACTIONS = ("compute", "region", "reuse")
# "unassessed": reused on similarity alone (the stage-1 baseline), without looking at what differs.
DIFFERENCES = ("exact", "none", "local", "global", "miss", "unassessed")


@dataclass(frozen=True)
class Plan:
    num_steps: int
    actions: tuple[str, ...] = ()  # per step; empty means every step is computed
    source_id: str | None = None
    similarity: float | None = None
    difference: str = "miss"
    region_fraction: float | None = None
    token_mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # bool [F', H', W']
    probe_pending: bool = False  # the first step is computed before the plan is final

    def __post_init__(self):
        if not self.actions:
            object.__setattr__(self, "actions", ("compute",) * self.num_steps)
        if len(self.actions) != self.num_steps or any(a not in ACTIONS for a in self.actions):
            raise ValueError(f"plan needs one of {ACTIONS} per step, got {self.actions}")
        if self.difference not in DIFFERENCES:
            raise ValueError(f"difference {self.difference!r}: expected one of {DIFFERENCES}")

    @property
    def is_hit(self) -> bool:
        return self.source_id is not None and any(a != "compute" for a in self.actions)

    @property
    def k1(self) -> int:
        """Leading steps taken from the source (stage 1)."""
        return next((i for i, a in enumerate(self.actions) if a != "reuse"), self.num_steps)

    @property
    def steps_reused(self) -> int:
        return self.actions.count("reuse")

    @property
    def region_steps(self) -> list[int]:
        return [i for i, a in enumerate(self.actions) if a == "region"]

    def stage_of(self, step: int) -> str:
        return {"reuse": "stage1", "region": "stage2", "compute": "stage3"}[self.actions[step]]

    @property
    def code(self) -> str:
        """The actions in short, for reports: `c` compute, `r` region, `-` reuse (e.g. `crrr`, `--cc`)."""
        return "".join({"compute": "c", "region": "r", "reuse": "-"}[a] for a in self.actions)


# ---- Chorus's planner ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerConfig:
    min_similarity: float = 0.5  # candidates' prompt-embedding cosine at least this (a cheap pre-filter)
    candidates: int = 8  # how many nearest cached requests the first step is compared with
    threshold: float = 0.3  # a token differs where its predicted clean latents differ by more than this
    dilate: int = 0  # grow the region by this many tokens in height and width
    max_region: float = 0.75  # a larger region is a global difference: computed in full
    final_compute: float = 0.0  # share of the steps at the end computed in full on every hit (stage 3)
    alpha: float = 2.0  # TGAA factor on the cross-attention to the new prompt's tokens in the region; 1 disables it
    # A token of the source whose final latent moved more than this from the source's first-step prediction was not
    # settled by that step: the comparison there says little, so it is recomputed too (None: trust the comparison).
    late_threshold: float | None = 0.5

    def __post_init__(self):
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity={self.min_similarity}: must lie in [-1, 1]")
        if self.candidates < 1 or self.dilate < 0:
            raise ValueError("candidates must be >= 1 and dilate >= 0")
        if not (self.threshold > 0 and 0.0 <= self.max_region <= 1.0 and 0.0 <= self.final_compute <= 1.0):
            raise ValueError("need threshold > 0 and max_region, final_compute in [0, 1]")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r}: must be a positive finite number")


def token_difference(target_x0: torch.Tensor, source_x0: torch.Tensor, patch_size) -> torch.Tensor:
    """How much two predicted clean latents `[C, F, H, W]` differ in each latent token `[F', H', W']`: the largest
    mean-over-channels absolute difference among its elements. The largest, not the mean: a token the source's
    object only grazes must be recomputed, or the object's edge stays in the new video."""
    diff = (target_x0.float() - source_x0.to(target_x0.device).float()).abs().mean(0)
    return F.max_pool3d(diff[None, None], tuple(patch_size))[0, 0]


class Planner:
    """Chorus's plans: compute the first step, compare, then reuse the source where the model agrees."""

    kind = "probe"

    def __init__(self, config: PlannerConfig | None = None):
        self.config = config or PlannerConfig()

    @property
    def candidates(self) -> int:
        """How many nearest cached requests to look at."""
        return self.config.candidates

    def feature_steps(self, num_steps: int) -> list[int]:
        """Steps whose features a later hit can use: every step after the first, before the final computed ones."""
        return list(range(1, num_steps - self.final_steps(num_steps)))

    def final_steps(self, num_steps: int) -> int:
        return min(num_steps - 1, math.floor(self.config.final_compute * num_steps + 0.5))

    def before(self, candidates: list, num_steps: int) -> Plan:
        """With candidates (`Match`es above the similarity floor), the first step is computed and the plan is
        decided after it (`after_probe`)."""
        usable = [c for c in candidates if c.similarity >= self.config.min_similarity][: self.config.candidates]
        if not usable or num_steps < 2:
            best = max((c.similarity for c in candidates), default=None)
            return Plan(num_steps, similarity=best)
        return Plan(num_steps, similarity=usable[0].similarity, probe_pending=True)

    def after_probe(self, plan: Plan, differences: dict, similarities: dict, unsettled: dict | None = None) -> Plan:
        """`differences`: candidate id -> per-token difference map at the first step; `unsettled`: candidate id ->
        per-token distance of its final latent from its own first-step prediction. Picks the candidate with the
        smallest region and plans around it."""
        cfg, n = self.config, plan.num_steps
        if not differences:
            return replace(plan, probe_pending=False)
        masks = {cid: self._region(d, (unsettled or {}).get(cid)) for cid, d in differences.items()}
        best = min(masks, key=lambda cid: (float(masks[cid].float().mean()), -similarities[cid]))
        mask = masks[best]
        fraction = float(mask.float().mean())
        common = dict(source_id=best, similarity=similarities[best], region_fraction=fraction, probe_pending=False)
        if fraction > cfg.max_region:
            return replace(plan, difference="global", **common)
        middle = "reuse" if not mask.any() else "region"
        final = self.final_steps(n)
        actions = ("compute",) + (middle,) * (n - 1 - final) + ("compute",) * final
        difference = "none" if middle == "reuse" else "local"
        return replace(plan, actions=actions, difference=difference, token_mask=mask, **common)

    def _region(self, difference: torch.Tensor, unsettled: torch.Tensor | None = None) -> torch.Tensor:
        mask = difference > self.config.threshold
        if self.config.late_threshold is not None and unsettled is not None:
            mask |= unsettled.to(mask.device) > self.config.late_threshold
        r = self.config.dilate
        if r:
            pooled = F.max_pool3d(mask.float()[None, None], (1, 2 * r + 1, 2 * r + 1), 1, (0, r, r))
            mask = pooled[0, 0] > 0
        return mask


# ---- the stage-1 baseline -------------------------------------------------------------------------------------

# (similarity threshold, fraction of the steps), highest first; NIRVANA's published table for CLIP similarities.
NIRVANA_TABLE = ((0.95, 0.50), (0.90, 0.40), (0.85, 0.30), (0.75, 0.20), (0.65, 0.10))
# The same idea calibrated for all-MiniLM-L6-v2, under which paraphrases score far lower than under CLIP.
MINILM_TABLE = ((0.95, 0.50), (0.90, 0.40), (0.85, 0.30), (0.80, 0.25))


@dataclass(frozen=True)
class StageOneConfig:
    table: tuple[tuple[float, float], ...] = MINILM_TABLE
    min_steps_computed: int = 1  # the target prompt must shape the final steps

    def __post_init__(self):
        thresholds = [t for t, _ in self.table]
        fractions = [f for _, f in self.table]
        if thresholds != sorted(thresholds, reverse=True) or fractions != sorted(fractions, reverse=True):
            raise ValueError("the stage-1 table must list thresholds and fractions from high to low")
        if any(not 0.0 <= f <= 1.0 for f in fractions) or self.min_steps_computed < 1:
            raise ValueError("fractions must lie in [0, 1] and min_steps_computed be >= 1")


class StageOnePlanner:
    """Stage-1-only reuse: skip the first k1 steps by starting from the best match's latent after k1 steps."""

    kind = "stage1"
    candidates = 1

    def __init__(self, config: StageOneConfig | None = None):
        self.config = config or StageOneConfig()

    def feature_steps(self, num_steps: int) -> list[int]:
        return []

    def k1(self, similarity: float, num_steps: int) -> int:
        fraction = next((f for t, f in self.config.table if similarity >= t), 0.0)
        return min(num_steps - self.config.min_steps_computed, math.floor(fraction * num_steps + 0.5))

    def before(self, candidates: list, num_steps: int) -> Plan:
        if not candidates:
            return Plan(num_steps)
        best = candidates[0]
        k1 = self.k1(best.similarity, num_steps)
        if k1 <= 0:
            return Plan(num_steps, similarity=best.similarity)
        actions = ("reuse",) * k1 + ("compute",) * (num_steps - k1)
        return Plan(num_steps, actions, best.entry_id, best.similarity, difference="unassessed")

    def after_probe(self, plan: Plan, differences: dict, similarities: dict) -> Plan:  # pragma: no cover
        raise AssertionError("stage-1 plans are final before denoising")
