"""The planners: Chorus's plan from first-step differences, and the stage-1 baseline's from similarity alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chorus.cache import Match
from chorus.planner import (
    MINILM_TABLE,
    NIRVANA_TABLE,
    Plan,
    Planner,
    PlannerConfig,
    StageOneConfig,
    StageOnePlanner,
    token_difference,
)

GRID = (2, 4, 4)


def differences(**fractions):
    """A difference map per candidate id whose first `fraction` of the tokens differ (by 1.0, else 0)."""
    out = {}
    for cid, fraction in fractions.items():
        d = torch.zeros(GRID).flatten()
        d[: round(fraction * d.numel())] = 1.0
        out[cid] = d.view(GRID)
    return out


def decide(planner: Planner, steps: int = 4, **fractions):
    candidates = [Match(cid, 0.9) for cid in fractions]
    plan = planner.before(candidates, steps)
    assert plan.probe_pending
    return planner.after_probe(plan, differences(**fractions), {c.entry_id: c.similarity for c in candidates})


def test_the_kind_of_difference_sets_the_plan():
    planner = Planner(PlannerConfig(threshold=0.5, max_region=0.75))
    none = decide(planner, a=0.0)
    assert (none.difference, none.code, none.is_hit, none.k1) == ("none", "c---", True, 0)
    local = decide(planner, a=0.25)
    assert (local.difference, local.code, local.region_fraction, local.region_steps) == (
        "local",
        "crrr",
        0.25,
        [1, 2, 3],
    )
    assert local.token_mask.sum() == 8
    whole = decide(planner, a=0.8)
    assert (whole.difference, whole.code, whole.is_hit) == ("global", "cccc", False)
    assert decide(planner, steps=50, a=0.25).code == "c" + "r" * 49


def test_the_candidate_with_the_smallest_region_is_chosen_and_stage3_is_kept():
    planner = Planner(PlannerConfig(threshold=0.5, final_compute=0.25))
    plan = decide(planner, a=0.5, b=0.125, c=0.25)
    assert plan.source_id == "b" and plan.code == "crrc"
    assert decide(Planner(PlannerConfig(final_compute=1.0)), a=0.0).code == "cccc"  # stage 3 may take every step


def test_candidates_below_the_similarity_floor_are_not_compared():
    planner = Planner(PlannerConfig(min_similarity=0.8, candidates=2))
    assert not planner.before([Match("a", 0.79)], 4).probe_pending
    assert planner.before([Match("a", 0.9), Match("b", 0.85), Match("c", 0.84)], 4).probe_pending
    assert not planner.before([Match("a", 0.99)], 1).probe_pending  # a one-step schedule has nothing to reuse


def test_dilation_grows_the_region_in_height_and_width_only():
    planner = Planner(PlannerConfig(threshold=0.5, dilate=1))
    d = torch.zeros(GRID)
    d[0, 1, 1] = 1.0
    mask = planner._region(d)
    assert mask[0, :3, :3].all() and mask.sum() == 9 and not mask[1].any()


def test_token_difference_is_the_largest_difference_in_each_patch():
    a = torch.zeros(3, 4, 8, 8)
    b = a.clone()
    b[:, 0:2, 0:2, 0:2] = 2.0  # one whole patch of (2, 2, 2) differs by 2 in every channel
    b[0, 3, 7, 7] = 3.0  # one element of another patch, in one channel of three: a grazed token differs too
    d = token_difference(a, b, (2, 2, 2))
    assert d.shape == (2, 4, 4) and d[0, 0, 0] == 2.0 and d[1, 3, 3] == 1.0 and d.sum() == 3.0


def test_plans_refuse_unknown_actions_and_wrong_lengths():
    with pytest.raises(ValueError, match="per step"):
        Plan(3, ("compute", "region"))
    with pytest.raises(ValueError, match="per step"):
        Plan(2, ("compute", "skip"))
    with pytest.raises(ValueError, match="difference"):
        Plan(2, difference="small")
    with pytest.raises(ValueError, match="alpha"):
        PlannerConfig(alpha=0.0)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 50])
def test_stage1_reuse_is_monotonic_in_similarity_and_leaves_a_step(num_steps):
    planner = StageOnePlanner(StageOneConfig(NIRVANA_TABLE))
    plans = [planner.before([Match("a", float(s))], num_steps) for s in np.linspace(-1.0, 1.0, 401)]
    k1s = [p.k1 if p.is_hit else 0 for p in plans]
    assert k1s == sorted(k1s)
    assert all(p.actions.count("compute") >= 1 for p in plans)  # the target prompt always shapes the final step


def test_stage1_tables_on_both_schedules():
    planner = StageOnePlanner(StageOneConfig(MINILM_TABLE))
    assert planner.before([Match("a", 0.99)], 4).code == "--cc"
    assert planner.before([Match("a", 0.99)], 50).k1 == 25  # NIRVANA: half of the steps at 0.95 and above
    assert planner.before([Match("a", 0.82)], 4).k1 == 1 and planner.before([Match("a", 0.82)], 50).k1 == 13
    assert not planner.before([Match("a", 0.5)], 4).is_hit and not planner.before([], 4).is_hit
    with pytest.raises(ValueError, match="high to low"):
        StageOneConfig(table=((0.9, 0.2), (0.95, 0.5)))
    with pytest.raises(ValueError, match="fractions"):
        StageOneConfig(table=((0.9, 1.5),))


def test_tokens_the_source_settled_only_after_its_first_step_are_recomputed():
    planner = Planner(PlannerConfig(threshold=0.5, late_threshold=0.5))
    candidates = [Match("a", 0.9)]
    plan = planner.before(candidates, 4)
    late = torch.zeros(GRID)
    late[1, 3, 3] = 0.8  # the source's final latent moved away from its first-step prediction here
    decided = planner.after_probe(plan, differences(a=0.0), {"a": 0.9}, {"a": late})
    assert decided.difference == "local" and decided.token_mask.sum() == 1 and decided.token_mask[1, 3, 3]
    trusting = Planner(PlannerConfig(threshold=0.5, late_threshold=None))
    assert trusting.after_probe(plan, differences(a=0.0), {"a": 0.9}, {"a": late}).difference == "none"
