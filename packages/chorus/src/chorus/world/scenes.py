"""The built-in world: procedural scenes of one or two coloured shapes moving over a plain background.

A `Scene` is a small value (background, objects with shape, colour, size, start corner and motion); `render`
turns it into an RGB clip `[F, H, W, 3]` float32 in [0, 1]. Everything is integer pixel geometry, so a scene
renders the same on every machine and the analyzer can be checked against exact ground truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

HEIGHT = 32
WIDTH = 32
NUM_FRAMES = 8
SPEED = 2  # pixels per frame for moving objects

SHAPES = ("circle", "square", "triangle")
# Object colours: saturated, far from each other and from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 225, 40),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
MOTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) per frame in pixels; y grows downwards
    "left": (-SPEED, 0),
    "right": (SPEED, 0),
    "up": (0, -SPEED),
    "down": (0, SPEED),
    "still": (0, 0),
}
SIZES = {"small": (6, 8), "large": (10, 12)}  # inclusive pixel ranges; 9 is "medium" and never named
MIN_SIZE, MAX_SIZE = 6, 12
GAP = 2  # two objects' boxes stay at least this many pixels apart in every frame


def size_word(size: int) -> str | None:
    for word, (lo, hi) in SIZES.items():
        if lo <= size <= hi:
            return word
    return None


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    motion: str
    size: int  # side of the bounding box, pixels
    x: int  # left column of the bounding box in frame 0
    y: int  # top row of the bounding box in frame 0

    def box(self, frame: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends, of the bounding box in `frame`."""
        dx, dy = MOTIONS[self.motion]
        x0, y0 = self.x + dx * frame, self.y + dy * frame
        return x0, y0, x0 + self.size, y0 + self.size


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    height: int = HEIGHT
    width: int = WIDTH
    num_frames: int = NUM_FRAMES
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("meta")
        return d


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape filling its bounding box (pixel centres tested)."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return np.abs(xx - 0.5) <= 0.5 * yy
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Scene -> frames [F, H, W, 3] float32 in [0, 1]."""
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) / 255.0
    video = np.broadcast_to(bg, (scene.num_frames, scene.height, scene.width, 3)).copy()
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.size)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32) / 255.0
        for f in range(scene.num_frames):
            x0, y0, x1, y1 = obj.box(f)
            # clip to the frame (sampled scenes never leave it, hand-made ones may)
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, scene.width), min(y1, scene.height)
            if cx0 >= cx1 or cy0 >= cy1:
                continue
            m = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            video[f, cy0:cy1, cx0:cx1][m] = colour
    return video


def _start_range(motion: str, size: int, extent: int, axis: int, frames: int) -> tuple[int, int]:
    """Inclusive range of start coordinates that keep the object inside the frame for the whole clip."""
    d = MOTIONS[motion][axis] * (frames - 1)
    lo = max(0, -d)
    hi = extent - size - max(0, d)
    return lo, hi


def _boxes_apart(a: SceneObject, b: SceneObject, frames: int) -> bool:
    for f in range(frames):
        ax0, ay0, ax1, ay1 = a.box(f)
        bx0, by0, bx1, by1 = b.box(f)
        if ax0 < bx1 + GAP and bx0 < ax1 + GAP and ay0 < by1 + GAP and by0 < ay1 + GAP:
            return False
    return True


def place_object(
    rng: np.random.Generator,
    shape: str,
    colour: str,
    motion: str,
    size: int,
    *,
    height: int = HEIGHT,
    width: int = WIDTH,
    num_frames: int = NUM_FRAMES,
) -> SceneObject:
    xlo, xhi = _start_range(motion, size, width, 0, num_frames)
    ylo, yhi = _start_range(motion, size, height, 1, num_frames)
    return SceneObject(shape, colour, motion, size, int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1)))


def layout(
    rng: np.random.Generator,
    background: str,
    objects: list[dict],
    *,
    height: int = HEIGHT,
    width: int = WIDTH,
    num_frames: int = NUM_FRAMES,
    max_tries: int = 200,
) -> Scene:
    """Place objects given their attributes (dicts with shape, colour, motion and size or size_word).

    Sizes left open are drawn from the full range; positions are drawn uniformly among those that keep every
    object inside the frame and two objects apart in every frame.
    """
    for _ in range(max_tries):
        placed: list[SceneObject] = []
        for spec in objects:
            size = spec.get("size")
            if size is None:
                lo, hi = SIZES[spec["size_word"]] if spec.get("size_word") else (MIN_SIZE, MAX_SIZE)
                size = int(rng.integers(lo, hi + 1))
            placed.append(
                place_object(
                    rng,
                    spec["shape"],
                    spec["colour"],
                    spec["motion"],
                    size,
                    height=height,
                    width=width,
                    num_frames=num_frames,
                )
            )
        if all(_boxes_apart(a, b, num_frames) for i, a in enumerate(placed) for b in placed[i + 1 :]):
            return Scene(background, tuple(placed), height, width, num_frames)
    raise ValueError(f"could not place {objects} apart in {max_tries} tries")


def noise_layout(background: str, objects: list[dict], noise: np.ndarray, grid: int = 4) -> Scene | None:
    """The scene a given starting noise `[3, F, H, W]` leads to: layout as a deterministic function of the noise.

    Why: a flow model's first prediction from pure noise is the mean over every layout it could be (a smear),
    so few-step samples of a model trained on independently drawn layouts show no objects. Tying each training
    clip's layout to its noise makes the noise -> video map a function, so paths are straight and few steps
    suffice; different seeds still give different positions and sizes. The tie is one a small RoPE transformer
    (no absolute positions) can learn: objects start on a `grid`-pixel lattice (the model's patch), and object i
    starts at the cell whose noise in channel i, frames 0-1 (the first temporal patch), sums highest among the
    cells that keep it in frame and apart from the objects placed before it: one patch's own sum, then an
    argmax. Sizes left open follow a global statistic of channel 2 (a standard normal mapped through its CDF).
    Returns None when the objects cannot be placed apart."""
    _, num_frames, height, width = noise.shape
    cell_sums = noise[:, :2].sum(1).reshape(3, height // grid, grid, width // grid, grid).sum((2, 4))
    placed: list[SceneObject] = []
    for i, spec in enumerate(objects):
        size = spec.get("size")
        if size is None:
            lo, hi = SIZES[spec["size_word"]] if spec.get("size_word") else (MIN_SIZE, MAX_SIZE)
            half = noise[2, i * num_frames // 2 : (i + 1) * num_frames // 2]
            u = 0.5 * (1 + math.erf(float(half.sum()) / math.sqrt(2 * half.size)))
            size = min(hi, lo + int(u * (hi - lo + 1)))
        xlo, xhi = _start_range(spec["motion"], size, width, 0, num_frames)
        ylo, yhi = _start_range(spec["motion"], size, height, 1, num_frames)
        rows = np.arange(-(-ylo // grid), yhi // grid + 1)
        cols = np.arange(-(-xlo // grid), xhi // grid + 1)
        scores = cell_sums[i % 3][np.ix_(rows, cols)]
        for flat in np.argsort(scores, axis=None, kind="stable")[::-1]:
            r, c = np.unravel_index(flat, scores.shape)
            obj = SceneObject(
                spec["shape"], spec["colour"], spec["motion"], size, int(cols[c] * grid), int(rows[r] * grid)
            )
            if all(_boxes_apart(obj, other, num_frames) for other in placed):
                placed.append(obj)
                break
        else:
            return None
    return Scene(background, tuple(placed), height, width, num_frames)
