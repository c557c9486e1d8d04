"""PNG plots of a benchmark report: speed against alignment per policy, and reuse over the trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speed_vs_alignment(report: dict, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    base = report["policies"].get("none", {}).get("alignment")
    for name, p in report["policies"].items():
        if p.get("speedup_vs_none") is None or p.get("alignment") is None:
            continue
        marker = "o" if name.startswith("chorus") else "s" if name in ("none", "nirvana") else "^"
        ax.scatter(p["speedup_vs_none"], p["alignment"], s=50, marker=marker)
        ax.annotate(name, (p["speedup_vs_none"], p["alignment"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if base is not None:
        ax.axhline(base - 1.0, color="grey", lw=0.8, ls="--", label="none - 1 point")
        ax.legend(loc="lower left", fontsize=8)
    s = report["settings"]
    ax.set_xlabel("throughput / throughput of none")
    ax.set_ylabel("mean alignment (points)")
    ax.set_title(f"speed vs alignment ({s.get('steps')} steps, {s.get('requests')} requests)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _rolling(x: np.ndarray, window: int) -> np.ndarray:
    if len(x) == 0:
        return x
    c = np.cumsum(np.insert(x.astype(float), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def reuse_over_trace(report: dict, path: str | Path, window: int = 25) -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6), dpi=120, sharex=True)
    steps = report["settings"].get("steps") or 1
    for name, p in report["policies"].items():
        per = p.get("per_request") or []
        if not per or p["config"].get("cache") is False:
            continue
        hits = np.array([r["outcome"] in ("hit", "exact") for r in per])
        saved = np.array([r["steps_saved"] for r in per])
        top.plot(_rolling(hits, window), label=name, lw=1.2)
        bottom.plot(np.cumsum(saved) / steps, label=name, lw=1.2)
    top.set_ylabel(f"hit rate (last {window})")
    top.set_ylim(0, 1)
    bottom.set_ylabel("saved steps (cumulative, in requests)")
    bottom.set_xlabel("request")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    if top.lines:
        top.legend(fontsize=8, loc="lower right")
    top.set_title(f"reuse over the trace ({steps} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [speed_vs_alignment(report, out / "speed_vs_alignment.png"), reuse_over_trace(report, out / "reuse.png")]
