"""Sweep Chorus's planner settings on a trace: one `none` reference, then one replay per variant, interleaved.

    python -m chorus.bench.sweep --steps 4 --grid planner [--variant NAME ...] [--limit N] [--report sweep.json]

Each variant is `chorus` with some `PlannerConfig` fields replaced (see GRIDS); the table printed at the end is the
same markdown as `chorus bench`. The defaults chosen from it are in docs/chorus/benchmark.md, the runs behind
them in docs/notes/chorus.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..planner import PlannerConfig
from .main import run_benchmark
from .policies import Policy, make_policy
from .report import markdown
from .trace import STANDARD_TRACE


def _variant(**fields) -> Policy:
    return make_policy("chorus", PlannerConfig(**fields))


def _intra(name: str, **options) -> Policy:
    return Policy(name, intra=name, intra_options=options)


GRIDS: dict[str, dict[str, Policy]] = {
    # how different a token's first-step prediction may be and still be the source's, and what a hit may cover
    "planner": {
        "default": _variant(),
        "threshold-0.15": _variant(threshold=0.15),
        "threshold-0.2": _variant(threshold=0.2),
        "threshold-0.4": _variant(threshold=0.4),
        "threshold-0.5": _variant(threshold=0.5),
        "threshold-0.7": _variant(threshold=0.7),
        "dilate-1": _variant(dilate=1),
        "late-off": _variant(late_threshold=None),
        "late-0.3": _variant(late_threshold=0.3),
        "late-0.7": _variant(late_threshold=0.7),
        "max-region-0.5": _variant(max_region=0.5),
        "max-region-0.9": _variant(max_region=0.9),
        "final-compute-0.25": _variant(final_compute=0.25),
        "final-compute-0.5": _variant(final_compute=0.5),
    },
    # which candidates are compared
    "retrieval": {
        "candidates-1": _variant(candidates=1),
        "candidates-2": _variant(candidates=2),
        "candidates-4": _variant(candidates=4),
        "min-similarity-0": _variant(min_similarity=0.0),
        "min-similarity-0.7": _variant(min_similarity=0.7),
    },
    # TGAA's strength in the region steps
    "tgaa": {"alpha-1": _variant(alpha=1.0), "alpha-4": _variant(alpha=4.0), "alpha-8": _variant(alpha=8.0)},
    # controls: policies that do exactly what `none` does, to see what the measurement itself does
    "control": {"none-b": Policy("none-b"), "none-c": Policy("none-c")},
    # intra-request caches on their own (for long schedules)
    "intra": {
        "fbc-0.05": _intra("fbc", threshold=0.05),
        "fbc-0.15": _intra("fbc", threshold=0.15),
        "taylorseer-lite-2": _intra("taylorseer", interval=2, lite=True),
        "taylorseer-lite-3": _intra("taylorseer", interval=3, lite=True),
        "taylorseer-lite-5": _intra("taylorseer", interval=5, lite=True),
        "magcache-0.06": _intra("magcache", threshold=0.06),
        "magcache-0.12": _intra("magcache", threshold=0.12),
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
