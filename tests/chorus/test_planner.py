"""The planner: stage boundaries are monotonic in similarity and respect the schedule."""

from __future__ import annotations

import numpy as np
import pytest

from chorus.planner import Planner, PlannerConfig


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 50])
def test_boundaries_are_monotonic_in_similarity(num_steps):
    planner = Planner()
    plans = [planner.plan(float(s), num_steps) for s in np.linspace(-1.0, 1.0, 401)]
    k1s, k2s = [p.k1 for p in plans], [p.k2 for p in plans]
    assert k1s == sorted(k1s) and k2s == sorted(k2s)
    for p in plans:
        assert 0 <= p.k1 <= p.k2 <= max(num_steps - 1, 0)
        assert p.steps_computed >= 1  # the target prompt always shapes the final step


def test_defaults_reuse_on_both_schedules():
    planner = Planner()
    assert planner.plan(0.99, 4).k1 == 2 and planner.plan(0.99, 50).k1 == 25  # NIRVANA: half of the steps at 0.95+
    assert planner.plan(0.82, 4).k1 == 1 and planner.plan(0.82, 50).k1 == 13
    assert not planner.plan(0.5, 4).is_hit and not planner.plan(0.5, 50).is_hit
    assert not planner.plan(None, 50).is_hit


def test_config_rejects_non_monotonic_tables():
    with pytest.raises(ValueError, match="stage1"):
        PlannerConfig(stage1=((0.9, 0.2), (0.95, 0.5)))
    with pytest.raises(ValueError, match="stage2"):
        PlannerConfig(stage2=((0.95, 0.2), (0.9, 0.5)))
    with pytest.raises(ValueError, match="fractions"):
        PlannerConfig(stage1=((0.9, 1.5),))
