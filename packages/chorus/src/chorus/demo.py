"""`chorus demo`: what Chorus does, in seconds. A short run of related prompts through one engine with an in-memory
cache (a scene, a paraphrase of it, an edit of it, an exact repeat, an unrelated scene), a table of what each request
reused, computed and saved, and one contact sheet with their frames side by side.

Everything shown is read from each request's `GenerationReport`, so the demo shows whatever the engine's reuse does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (what the request is to the ones before it, prompt, seed)
SEQUENCE = (
    ("scene", "a red circle moving left on a white background", 0),
    ("paraphrase", "a red circle moving to the left over a white background", 1),
    ("edit", "a blue circle moving left on a white background", 2),
    ("repeat", "a red circle moving left on a white background", 0),
    ("unrelated", "a yellow triangle moving up on a black background", 3),
)


@dataclass
class DemoRow:
    kind: str
    prompt: str
    seed: int
    frames: np.ndarray
    report: dict


def run(engine, sequence=SEQUENCE, steps: int | None = None) -> list[DemoRow]:
    rows = []
    for kind, prompt, seed in sequence:
        result = engine.generate(prompt, seed=seed, num_inference_steps=steps)
        rows.append(DemoRow(kind, prompt, seed, result.frames, result.report.to_dict()))
    return rows


def table(rows: list[DemoRow]) -> str:
    """A markdown table: each request's outcome, its source among the rows above, steps and calls, time."""
    labels = {row.report["request_id"]: f"#{i + 1}" for i, row in enumerate(rows)}
    full = max((r.report["transformer_calls"] for r in rows if r.report["steps_reused"] == 0), default=None)
    head = "| # | request | prompt | outcome | source | similarity | steps reused / computed | transformer calls |"
    lines = [head + " seconds |", "|" + "---|" * 9]
    for i, row in enumerate(rows):
        r = row.report
        source = labels.get(r["source_id"], r["source_id"] or "")
        similarity = f"{r['similarity']:.2f}" if r["similarity"] is not None else ""
        calls = str(r["transformer_calls"]) + (f" of {full}" if full else "")
        lines.append(
            f"| {i + 1} | {row.kind} | {row.prompt} (seed {row.seed}) | {r['outcome']} | {source} | {similarity} | "
            f"{r['steps_reused']} / {r['steps_computed']} | {calls} | {r['total_seconds']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: list[DemoRow]) -> str:
    reports = [row.report for row in rows]
    computed = sum(r["steps_computed"] for r in reports)
    total = sum(r["num_steps"] for r in reports)
    hits = sum(r["outcome"] in ("hit", "exact") for r in reports)
    return (
        f"{hits} of {len(rows)} requests reused earlier work; {computed} of {total} denoising steps computed "
        f"({total - computed} saved)"
    )


def contact_sheet(rows: list[DemoRow], path: str | Path, scale: int = 3) -> Path:
    """One PNG: a row per request (its number, kind and outcome on the left), its frames side by side."""
    from PIL import Image, ImageDraw

    from .video import atomic_write, to_uint8

    frames, height, width = (rows[0].frames.shape[i] for i in range(3))
    tile_h, tile_w, label_w, gap = height * scale, width * scale, 150, 2
    sheet = Image.new("RGB", (label_w + frames * (tile_w + gap), len(rows) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        y = i * (tile_h + gap)
        draw.text((4, y + 4), f"#{i + 1} {row.kind}", fill="black")
        draw.text((4, y + 18), row.report["outcome"], fill="gray")
        for j, frame in enumerate(to_uint8(row.frames)):
            tile = Image.fromarray(frame).resize((tile_w, tile_h), Image.NEAREST)
            sheet.paste(tile, (label_w + j * (tile_w + gap), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def check_sheet_path(path: str | Path) -> Path:
    from .video import check_writable_dir

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {path}: the contact sheet is a .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable_dir(path.parent, f"--out {path}")
    return path
