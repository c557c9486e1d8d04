"""The benchmark report: `out.json` (machine, versions, settings, and per policy the measured figures) and the
markdown summary printed to stdout."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Every policy summary carries these; the rest are extras.
REQUIRED_FIELDS = (
    "requests",
    "wall_s",
    "throughput_rps",
    "latency_p50_s",
    "latency_p99_s",
    "hit_rate",
    "transformer_calls",
    "alignment",
    "fidelity_psnr",
    "speedup_vs_none",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict:
    import diffusers
    import numpy
    import torch
    import transformers

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=here.parent, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            out["chorus_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def build_report(results: dict[str, dict], settings: dict, machine_info: dict) -> dict:
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "settings": settings,
        "policies": results,
    }


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict, *, with_context: bool = True) -> str:
    """A table of the policies, plus the alignment deltas against `none`."""
    policies = report["policies"]
    base = policies.get("none", {}).get("alignment")
    head = (
        "| policy | requests | wall s | req/s | speedup | p50 s | p99 s | hit rate | transformer calls "
        "| saved steps | alignment | Δ align | PSNR dB | seeds differ |"
    )
    lines = [head, "|" + "---|" * 14]
    for name, p in policies.items():
        delta = None if base is None or p["alignment"] is None else p["alignment"] - base
        label = name + (f" ({p['intra_chosen']})" if p.get("intra_chosen") else "")
        ci = p.get("alignment_ci95") if name != "none" else None
        delta_text = _fmt(delta, "+.1f") + (f" ± {ci:.1f}" if ci is not None and delta is not None else "")
        lines.append(
            f"| {label} | {p['requests']} | {p['wall_s']:.1f} | {_fmt(p['throughput_rps'], '.3f')} "
            f"| {_fmt(p['speedup_vs_none'], '.2f')}x | {_fmt(p['latency_p50_s'], '.3f')} "
            f"| {_fmt(p['latency_p99_s'], '.3f')} | {p['hit_rate']:.0%} | {p['transformer_calls']} "
            f"| {p.get('steps_saved_fraction', 0):.0%} | {_fmt(p['alignment'], '.1f')} | {delta_text} "
            f"| {_fmt(p['fidelity_psnr'], '.1f')} | {_fmt(p.get('seed_pairs_visibly_different'), '.0%')} |"
        )
    if not with_context:
        return "\n".join(lines)
    s, m = report["settings"], report["machine"]
    intro = (
        f"**Trace** `{s.get('trace')}` ({s.get('requests')} requests), **model** `{s.get('model')}`, "
        f"**{s.get('steps')} steps**, {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} torch "
        f"threads), load average {m.get('loadavg_at_start')} -> {m.get('loadavg_at_end')}."
    )
    notes = (
        "Speedup is throughput over `none` in the same run. Alignment: the world analyzer's score in points (0-100); "
        "Δ against `none`, ± the 95 % confidence half-width of that difference paired by request (a hit's video is a "
        "draw of its own: a few requests can move a mean by a point). PSNR: against the same request under `none` "
        "(identical = 100). Saved steps: reused steps plus the region steps' work not done, as a share of all steps. "
        "Seeds differ: of same-prompt pairs under two new seeds after the trace, the share whose videos differ "
        "visibly."
    )
    parts = [intro, "\n".join(lines), notes, "Per request kind (alignment / hit rate):", by_kind(report)]
    parts += ["Per edited attribute (alignment):", by_attribute(report)]
    parts += [
        "What the engine decided, per request kind, and the mean service time of each decision:",
        decisions(report),
    ]
    return "\n\n".join(parts)


def by_kind(report: dict) -> str:
    """Alignment (points) and hit rate per request kind: where reuse helps and where it costs."""
    policies = report["policies"]
    kinds = sorted({r["kind"] for p in policies.values() for r in p.get("per_request", [])})
    lines = ["| policy | " + " | ".join(f"{k}: align / hit" for k in kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for name, p in policies.items():
        cells = []
        for k in kinds:
            rows = [r for r in p.get("per_request", []) if r["kind"] == k]
            scored = [r["alignment"] for r in rows if r["alignment"] is not None]
            align = sum(scored) / len(scored) if scored else None
            hits = sum(r["outcome"] in ("hit", "exact") for r in rows) / len(rows) if rows else 0.0
            cells.append(f"{_fmt(align, '.1f')} / {hits:.0%} (n={len(rows)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_attribute(report: dict) -> str:
    """Alignment (points) of the edits per attribute they changed."""
    policies = report["policies"]
    rows = [r for p in policies.values() for r in p.get("per_request", []) if r.get("attribute")]
    attributes = sorted({r["attribute"] for r in rows})
    lines = ["| policy | " + " | ".join(attributes) + " |", "|" + "---|" * (len(attributes) + 1)]
    for name, p in policies.items():
        cells = []
        for a in attributes:
            scored = [r["alignment"] for r in p.get("per_request", []) if r.get("attribute") == a]
            scored = [x for x in scored if x is not None]
            cells.append(f"{_fmt(sum(scored) / len(scored) if scored else None, '.1f')} (n={len(scored)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decisions(report: dict) -> str:
    """For each caching policy: per request kind, how many requests got each difference kind; then the mean
    service time (ms) of each difference kind (a hit must not be slower than a miss)."""
    lines = []
    for name, p in report["policies"].items():
        by_kind = p.get("differences_by_kind") or {}
        if not any(d != "miss" for counts in by_kind.values() for d in counts):
            continue
        cells = "; ".join(
            f"{kind}: " + ", ".join(f"{d} {n}" for d, n in sorted(counts.items())) for kind, counts in by_kind.items()
        )
        service = ", ".join(f"{d} {1000 * t:.0f}" for d, t in (p.get("service_by_difference") or {}).items())
        same = p.get("hits_from_the_same_topic")
        topic = f" Hits whose source is of the same topic: {same:.0%}." if same is not None else ""
        overhead = p.get("computed_overhead")
        cost = f" Requests computed in full cost {overhead:+.1%} over `none`." if overhead is not None else ""
        lines.append(f"- `{name}`: {cells}. Service ms: {service}.{topic}{cost}")
    return "\n".join(lines) or "(no policy reused anything)"
