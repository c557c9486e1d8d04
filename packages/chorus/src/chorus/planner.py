"""Similarity -> stage plan: how many leading steps a request takes from its cached source.

A plan over N steps has three stages: steps [0, k1) are skipped by starting from the source's latent after k1
steps (stage 1, full reuse); steps [k1, k2) are stage 2 (region reuse; computed in full until stage 2 lands);
steps [k2, N) are stage 3, computed in full to repair the seams. Both boundaries are non-decreasing step
functions of the similarity, given as fractions of N so that one table serves 4-step and 50-step schedules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class StagePlan:
    num_steps: int
    k1: int = 0
    k2: int = 0
    similarity: float | None = None
    source_id: str | None = None

    @property
    def is_hit(self) -> bool:
        return self.k1 > 0

    @property
    def steps_computed(self) -> int:
        return self.num_steps - self.k1

    def stage_of(self, step: int) -> str:
        return "stage1" if step < self.k1 else "stage2" if step < self.k2 else "stage3"

    def to_dict(self) -> dict:
        return asdict(self)


# (similarity threshold, fraction of the steps), highest threshold first. Calibrated for all-MiniLM-L6-v2
# cosine similarities, under which paraphrases score far lower than under CLIP (NIRVANA's 0.65..0.95 table).
DEFAULT_STAGE1 = ((0.95, 0.50), (0.90, 0.40), (0.85, 0.30), (0.80, 0.25))
DEFAULT_STAGE2 = ((0.95, 0.75), (0.90, 0.65), (0.85, 0.55), (0.80, 0.50))


@dataclass(frozen=True)
class PlannerConfig:
    stage1: tuple[tuple[float, float], ...] = DEFAULT_STAGE1
    stage2: tuple[tuple[float, float], ...] = DEFAULT_STAGE2
    min_steps_computed: int = 1  # stage 3 never vanishes: the target prompt must shape the final steps
    # Stage 2 shrinks linearly from its full length at mask fraction `full_stage2_mask` to nothing at
    # `no_stage2_mask`: a large mask leaves little to reuse, and its seams would cover most of the video.
    full_stage2_mask: float = 0.25
    no_stage2_mask: float = 0.60

    def __post_init__(self):
        for name in ("stage1", "stage2"):
            table = getattr(self, name)
            thresholds = [t for t, _ in table]
            fractions = [f for _, f in table]
            if thresholds != sorted(thresholds, reverse=True) or fractions != sorted(fractions, reverse=True):
                raise ValueError(f"planner {name} table must list thresholds and fractions from high to low")
            if any(not 0.0 <= f <= 1.0 for f in fractions):
                raise ValueError(f"planner {name} fractions must lie in [0, 1]")
        if self.min_steps_computed < 1:
            raise ValueError("min_steps_computed must be at least 1")
        if not 0.0 <= self.full_stage2_mask <= self.no_stage2_mask <= 1.0:
            raise ValueError("need 0 <= full_stage2_mask <= no_stage2_mask <= 1")

    @property
    def min_similarity(self) -> float:
        return self.stage1[-1][0] if self.stage1 else math.inf


def _lookup(table, similarity: float) -> float:
    for threshold, fraction in table:
        if similarity >= threshold:
            return fraction
    return 0.0


class Planner:
    def __init__(self, config: PlannerConfig | None = None):
        self.config = config or PlannerConfig()

    def plan(self, similarity: float | None, num_steps: int, source_id: str | None = None) -> StagePlan:
        if similarity is None:
            return StagePlan(num_steps)
        cap = num_steps - self.config.min_steps_computed
        k1 = min(cap, math.floor(_lookup(self.config.stage1, similarity) * num_steps + 0.5))
        if k1 <= 0:
            return StagePlan(num_steps, similarity=similarity)
        k2 = max(k1, min(cap, math.floor(_lookup(self.config.stage2, similarity) * num_steps + 0.5)))
        return StagePlan(num_steps, k1, k2, similarity, source_id)

    def with_mask_fraction(self, plan: StagePlan, fraction: float) -> StagePlan:
        """Shorten stage 2 as the region to recompute grows (non-increasing in the fraction)."""
        lo, hi = self.config.full_stage2_mask, self.config.no_stage2_mask
        keep = 1.0 if fraction <= lo else 0.0 if fraction >= hi else (hi - fraction) / (hi - lo)
        return replace(plan, k2=plan.k1 + math.floor((plan.k2 - plan.k1) * keep + 0.5))

    def candidates(self, num_steps: int) -> list[StagePlan]:
        """Every distinct hit plan the tables can produce for this schedule (what a source should prepare for)."""
        plans = {}
        for threshold in sorted({t for t, _ in (*self.config.stage1, *self.config.stage2)}):
            plan = self.plan(threshold, num_steps)
            if plan.is_hit:
                plans[(plan.k1, plan.k2)] = plan
        return list(plans.values())
