"""The judge of the built-in world: reads a clip, finds its objects and their attributes, scores prompts.

`analyze(frames)` works on any `[F, H, W, 3]` clip (float in [0, 1] or uint8):

1. background: the median colour of the clip, snapped to the nearest background colour;
2. every pixel is explained as a blend `alpha * c + (1 - alpha) * background` for each object colour `c`; it
   belongs to the colour with the smallest residual when its alpha is at least one half (so a blurred red edge on
   white counts as red, not as orange);
3. per colour and frame, the largest 8-connected region is that colour's object in that frame; a colour seen in at
   least half of the frames (with a minimum area) is an object;
4. shape: the best intersection-over-union with the circle, square and triangle templates fitted to the region's
   bounding box, voted over frames; motion: the least-squares slope of the centroid track; size: the median side
   of the bounding box.

`alignment(prompt, analysis)` is the fraction of the prompt's attributes the clip shows (the role CLIP score plays
for real models); `attribute_hits` gives the per-attribute detail used by the evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import scenes
from .prompts import PromptSpec, parse

ALPHA_MIN = 0.5
RESIDUAL_MAX = 0.25  # RGB distance in [0, 1] units allowed off the blend line
MIN_AREA = 10  # pixels; the smallest rendered object (a 6-pixel triangle) covers 18
STILL_MAX = 4.0  # pixels of displacement over the clip below which an object is still


@dataclass
class DetectedObject:
    colour: str
    shape: str
    motion: str
    size: int
    size_word: str | None
    frames_seen: int
    area: float  # median pixel area
    displacement: tuple[float, float]  # (dx, dy) over the whole clip, pixels
    start: tuple[float, float]  # centroid (x, y) in the first frame it is seen
    shape_scores: dict = field(default_factory=dict)


@dataclass
class Analysis:
    background: str
    objects: list[DetectedObject]

    @property
    def count(self) -> int:
        return len(self.objects)

    def find(self, colour: str) -> DetectedObject | None:
        return next((o for o in self.objects if o.colour == colour), None)

    def to_dict(self) -> dict:
        return {"background": self.background, "count": self.count, "objects": [asdict(o) for o in self.objects]}


_BG_NAMES = list(scenes.BACKGROUNDS)
_BG = np.array([scenes.BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32) / 255.0
_OBJ_NAMES = list(scenes.COLOURS)
_OBJ = np.array([scenes.COLOURS[n] for n in _OBJ_NAMES], dtype=np.float32) / 255.0


def _as_float(frames) -> np.ndarray:
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames: expected [F, H, W, 3], got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a 2-D boolean mask (0 = background), by max-label propagation."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        neigh = np.max(np.stack([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]), axis=0)
        new = np.where(mask, neigh, 0)
        if np.array_equal(new, labels):
            return labels
        labels = new


def shape_template(shape: str, h: int, w: int) -> np.ndarray:
    """A shape filling an h x w box, with the renderer's geometry."""
    cy = (np.arange(h) + 0.5) / h
    cx = (np.arange(w) + 0.5) / w
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    return np.abs(xx - 0.5) <= 0.5 * yy


def _shape_scores(region: np.ndarray) -> dict[str, float]:
    ys, xs = np.nonzero(region)
    crop = region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    out = {}
    for shape in scenes.SHAPES:
        t = shape_template(shape, h, w)
        out[shape] = float((t & crop).sum() / (t | crop).sum())
    return out


def _motion(track: list[tuple[int, float, float]], num_frames: int) -> tuple[str, tuple[float, float]]:
    f = np.array([t[0] for t in track], dtype=np.float64)
    if len(f) < 2 or np.ptp(f) == 0:
        return "still", (0.0, 0.0)
    dx = np.polyfit(f, [t[1] for t in track], 1)[0] * (num_frames - 1)
    dy = np.polyfit(f, [t[2] for t in track], 1)[0] * (num_frames - 1)
    if max(abs(dx), abs(dy)) < STILL_MAX:
        return "still", (float(dx), float(dy))
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (float(dx), float(dy))
    return ("down" if dy > 0 else "up"), (float(dx), float(dy))


def analyze(frames) -> Analysis:
    """Find the objects of a clip of this world and their attributes."""
    video = _as_float(frames)
    num_frames = video.shape[0]
    median = np.median(video.reshape(-1, 3), axis=0)
    bg_idx = int(np.argmin(((_BG - median) ** 2).sum(-1)))
    bg = _BG[bg_idx]

    # blend model: pixel = bg + alpha * (c - bg); alpha by projection, residual off the line
    d = video[..., None, :] - bg  # [F, H, W, 1, 3]
    axis = _OBJ - bg  # [K, 3]
    alpha = (d * axis).sum(-1) / (axis * axis).sum(-1)  # [F, H, W, K]
    alpha_c = np.clip(alpha, 0.0, 1.0)
    residual = np.linalg.norm(d - alpha_c[..., None] * axis, axis=-1)
    best = np.argmin(residual, axis=-1)  # [F, H, W]
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_res = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    solid = (best_alpha >= ALPHA_MIN) & (best_res <= RESIDUAL_MAX)

    objects = []
    for k, name in enumerate(_OBJ_NAMES):
        mask = solid & (best == k)
        if mask.sum() < MIN_AREA:
            continue
        track, areas, sides, votes = [], [], [], {s: 0.0 for s in scenes.SHAPES}
        for f in range(num_frames):
            if mask[f].sum() < MIN_AREA:
                continue
            labels = _components(mask[f])
            ids, counts = np.unique(labels[labels > 0], return_counts=True)
            region = labels == ids[np.argmax(counts)]
            area = int(region.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(region)
            track.append((f, float(xs.mean()), float(ys.mean())))
            areas.append(area)
            sides.append(max(int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1))
            scores = _shape_scores(region)
            best_shape = max(scores, key=scores.get)
            votes[best_shape] += 1
        if len(track) * 2 < num_frames:
            continue
        motion, disp = _motion(track, num_frames)
        size = int(np.median(sides))
        objects.append(
            DetectedObject(
                colour=name,
                shape=max(votes, key=votes.get),
                motion=motion,
                size=size,
                size_word=scenes.size_word(size),
                frames_seen=len(track),
                area=float(np.median(areas)),
                displacement=disp,
                start=(track[0][1], track[0][2]),
                shape_scores=votes,
            )
        )
    return Analysis(background=_BG_NAMES[bg_idx], objects=objects)


def attribute_hits(spec: PromptSpec, analysis: Analysis) -> dict[str, list[bool]]:
    """Per attribute, one True/False per thing the prompt asks: background, count, and per object colour,
    shape, motion and (when named) size. A prompt object is matched to the detected object of its colour, else
    to a detected object left unmatched (so a wrong colour does not also cost the shape and motion)."""
    hits: dict[str, list[bool]] = {
        "background": [analysis.background == spec.background],
        "count": [analysis.count == len(spec.objects)],
        "colour": [],
        "shape": [],
        "motion": [],
        "size": [],
    }
    matched: dict[int, DetectedObject | None] = {}
    free = [o for o in analysis.objects if o.colour not in {p.colour for p in spec.objects}]
    for i, p in enumerate(spec.objects):
        matched[i] = analysis.find(p.colour)
    for i in range(len(spec.objects)):
        if matched[i] is None and free:
            matched[i] = free.pop(0)
    for i, p in enumerate(spec.objects):
        det = matched[i]
        hits["colour"].append(det is not None and det.colour == p.colour)
        hits["shape"].append(det is not None and det.shape == p.shape)
        hits["motion"].append(det is not None and det.motion == p.motion)
        if p.size:
            hits["size"].append(det is not None and det.size_word == p.size)
    return hits


def alignment(prompt: str | PromptSpec, frames_or_analysis) -> float:
    """Fraction of the prompt's attributes the clip shows, in [0, 1]."""
    spec = parse(prompt) if isinstance(prompt, str) else prompt
    if spec is None:
        raise ValueError(f"prompt {prompt!r}: not a prompt of the built-in world (no shape or background found)")
    analysis = frames_or_analysis if isinstance(frames_or_analysis, Analysis) else analyze(frames_or_analysis)
    hits = attribute_hits(spec, analysis)
    flat = [h for values in hits.values() for h in values]
    return sum(flat) / len(flat)


def visibly_different(a: Analysis, b: Analysis) -> bool:
    """Whether two clips of one prompt differ visibly: an object starts at least 2 pixels apart or differs in size,
    or the object counts differ (how seed diversity is measured)."""
    for oa in a.objects:
        ob = b.find(oa.colour)
        if ob is None:
            return True
        if np.hypot(oa.start[0] - ob.start[0], oa.start[1] - ob.start[1]) >= 2.0 or oa.size != ob.size:
            return True
    return a.count != b.count
