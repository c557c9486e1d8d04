"""Sweep the planner's tables and stage 2's settings on a trace: one `none` reference, then one replay per variant.

    python -m chorus.bench.sweep --steps 4 --grid default \
        [--model builtin] [--limit N] [--report sweep.json]

Each variant is `chorus` with some PlannerConfig / Stage2Config fields replaced (see GRIDS); the table printed at the
end is the same markdown as `chorus bench`. The defaults, and why: docs/chorus/benchmark.md, docs/notes/chorus.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..planner import PlannerConfig
from ..stage2 import Stage2Config
from .main import run_benchmark
from .policies import Policy, make_policy
from .report import markdown
from .trace import STANDARD_TRACE

S1_DEFAULT = PlannerConfig().stage1
S2_DEFAULT = PlannerConfig().stage2
# Stage-1 tables from cautious to eager (similarity under MiniLM, fraction of the steps skipped).
S1_STRICT = ((0.95, 0.50), (0.90, 0.40), (0.85, 0.30))
S1_WIDE = ((0.95, 0.50), (0.90, 0.40), (0.85, 0.30), (0.80, 0.25), (0.70, 0.25))
S1_EAGER = ((0.90, 0.50), (0.80, 0.40), (0.70, 0.25))
S2_WIDE = ((0.95, 0.75), (0.90, 0.65), (0.85, 0.55), (0.80, 0.50), (0.70, 0.50))
S2_EAGER = ((0.90, 0.75), (0.80, 0.65), (0.70, 0.50))
# Shallow stage 1 (a quarter of the steps for every hit), for models that settle an edited attribute early.
S1_SHALLOW = ((0.80, 0.25),)


def _variant(stage1=None, stage2=None, *, planner: dict | None = None, **s2) -> Policy:
    p = PlannerConfig(stage1=stage1 or S1_DEFAULT, stage2=stage2 or S2_DEFAULT, **(planner or {}))
    mask = s2.pop("mask", None)
    s = Stage2Config(**s2)
    if mask is not None:
        s = replace(s, mask=replace(s.mask, **mask))
    return make_policy("chorus", p, s)


def _intra(name: str, **options) -> Policy:
    return Policy(name, intra=name, intra_options=options)


GRIDS: dict[str, dict[str, Policy]] = {
    # which similarities may reuse, and how much
    "tables": {
        "strict": _variant(S1_STRICT, S2_DEFAULT[:3]),
        "default": _variant(),
        "wide": _variant(S1_WIDE, S2_WIDE),
        "eager": _variant(S1_EAGER, S2_EAGER),
        "wide-stage1": _variant(S1_WIDE, S1_WIDE),
        "eager-stage1": _variant(S1_EAGER, S1_EAGER),
        "shallow": _variant(S1_SHALLOW),
        "shallow-alpha4": _variant(S1_SHALLOW, alpha=4.0),
        "shallow-strict": _variant(S1_SHALLOW, S2_DEFAULT[:3]),
    },
    # stage 2: TGAA strength and the region mask, at the default tables
    "stage2": {
        "alpha1": _variant(alpha=1.0),
        "alpha2": _variant(alpha=2.0),
        "alpha4": _variant(alpha=4.0),
        "alpha8": _variant(alpha=8.0),
        "tight-mask": _variant(mask={"dilate": 0}),
        "half-maps-tight": _variant(mask={"top_fraction": 0.5, "dilate": 0}),  # half of the maps, undilated
        "dilated-mask": _variant(mask={"dilate": 1, "temporal_window": 1}),
        "tight-alpha1": _variant(alpha=1.0, mask={"dilate": 0}),
        "tight-alpha4": _variant(alpha=4.0, mask={"dilate": 0}),
        "strict-tight": _variant(S1_STRICT, S2_DEFAULT[:3], mask={"dilate": 0}),
        "high-threshold": _variant(mask={"threshold": 0.7}),
        "no-mask-cap": _variant(planner={"full_stage2_mask": 0.9, "no_stage2_mask": 1.0}),
    },
    # controls: policies that do exactly what `none` does, to see what the measurement itself does
    "control": {"none-b": Policy("none-b"), "none-c": Policy("none-c")},
    # intra-request caches on their own (for long schedules)
    "intra": {
        "fbc-0.05": _intra("fbc", threshold=0.05),
        "fbc-0.15": _intra("fbc", threshold=0.15),
        "fbc-0.3": _intra("fbc", threshold=0.3),
        "taylorseer-lite-2": _intra("taylorseer", interval=2, lite=True),
        "taylorseer-lite-3": _intra("taylorseer", interval=3, lite=True),
        "taylorseer-lite-5": _intra("taylorseer", interval=5, lite=True),
        "magcache-0.06": _intra("magcache", threshold=0.06),
        "magcache-0.12": _intra("magcache", threshold=0.12),
        "magcache-0.12-k5": _intra("magcache", threshold=0.12, max_skip_steps=5),
        "magcache-0.03": _intra("magcache", threshold=0.03),
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chorus.bench.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(STANDARD_TRACE), help="JSONL trace (default: the standard trace)")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--grid", choices=sorted(GRIDS), action="append", help="repeatable; default: all grids")
    ap.add_argument("--variant", action="append", help="only these variants (names from the grids)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--report", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nirvana", action="store_true", help="also replay the nirvana baseline")
    ap.add_argument("--policy", action="append", default=[], help="also replay these named policies")
    a = ap.parse_args(argv)
    variants: dict[str, Policy] = {}
    for g in a.grid or sorted(GRIDS):
        variants.update(GRIDS[g])
    if a.variant:
        variants = {k: v for k, v in variants.items() if k in a.variant}

    def factory(name: str) -> Policy:
        return replace(variants[name], name=name) if name in variants else make_policy(name)

    out = run_benchmark(
        a.trace,
        ["none", *(["nirvana"] if a.nirvana else []), *a.policy, *variants],
        model=a.model,
        steps=a.steps,
        report_path=a.report,
        threads=a.threads or None,
        limit=a.limit,
        policy_factory=factory,
    )
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
