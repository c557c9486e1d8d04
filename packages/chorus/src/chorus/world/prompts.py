"""Prompts for the built-in world: attribute specs, their many wordings, and a parser back to attributes.

A `PromptSpec` says what a prompt asks for (background; per object shape, colour, motion and optionally a size
word). `realize` words a spec with templates and synonyms, so that one scene has many paraphrases ("a crimson
disc drifting leftward" and "a red circle moving left" ask for the same thing) and prompt streams show the
near-duplicate and edit structure of real ones. `parse` reads any such prompt back into its spec.

Held out from training, and used to measure generalisation: some templates, one synonym per attribute value, and
some attribute combinations (colour-shape and colour-motion pairs). `sample_spec(rng, "train")` never produces a
held-out combination and `realize(..., split="train")` never uses a held-out template or synonym; every
`heldout_prompt` contains a held-out combination and, with probability `p_word`, held-out wordings.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from . import scenes

# value -> (training synonyms, held-out synonyms)
COLOUR_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "red": (("red", "scarlet", "cherry"), ("crimson",)),
    "green": (("green", "emerald", "lime"), ("grass-green",)),
    "blue": (("blue", "azure", "cobalt"), ("sky-blue",)),
    "yellow": (("yellow", "golden"), ("lemon",)),
    "purple": (("purple", "lilac", "lavender"), ("violet",)),
    "orange": (("orange", "amber"), ("tangerine",)),
}
SHAPE_WORDS = {
    "circle": (("circle", "ball", "dot", "orb"), ("disc",)),
    "square": (("square", "box", "block", "cube"), ("tile",)),
    "triangle": (("triangle", "wedge"), ("pyramid",)),
}
MOTION_WORDS = {
    "left": (("moving left", "going left", "sliding to the left", "heading left"), ("drifting leftward",)),
    "right": (("moving right", "going right", "sliding to the right", "heading right"), ("drifting rightward",)),
    "up": (("moving up", "rising", "going upward", "climbing"), ("floating upward",)),
    "down": (("moving down", "falling", "going downward", "sinking"), ("descending",)),
    "still": (("staying still", "not moving", "motionless", "at rest"), ("standing still",)),
}
BACKGROUND_WORDS = {
    "white": (("white", "pale"), ("snow-white",)),
    "black": (("black", "dark"), ("jet-black",)),
    "gray": (("gray", "grey"), ("silver",)),
}
SIZE_WORDS = {
    "small": (("small", "tiny", "little"), ("petite",)),
    "large": (("large", "big"), ("huge",)),
}

# Object phrases: {size} may be empty. Scene templates: {objs} is the objects joined by " and ".
OBJECT_FORMS = (
    ("a {size}{colour} {shape} {motion}", "a {size}{colour} {shape} that is {motion}"),
    ("a {size}{shape} in {colour} {motion}",),
)
SCENE_TEMPLATES = (
    (
        "{objs} on a {bg} background",
        "{objs}, {bg} background",
        "a video of {objs} on a {bg} background",
        "{bg} background with {objs}",
        "a clip showing {objs} against a {bg} backdrop",
        "an animation of {objs}, the background is {bg}",
    ),
    (
        "footage of {objs} in front of a {bg} wall",
        "on a plain {bg} canvas: {objs}",
    ),
)

HELDOUT_COLOUR_SHAPE = frozenset({("red", "triangle"), ("blue", "square"), ("green", "circle"), ("orange", "circle")})
HELDOUT_COLOUR_MOTION = frozenset({("yellow", "down"), ("purple", "left")})

ATTRIBUTES = ("colour", "shape", "motion", "background", "count", "size")


@dataclass(frozen=True)
class ObjectPrompt:
    shape: str
    colour: str
    motion: str
    size: str | None = None  # "small", "large" or unnamed


@dataclass(frozen=True)
class PromptSpec:
    background: str
    objects: tuple[ObjectPrompt, ...]

    def _object_specs(self) -> list[dict]:
        return [{"shape": o.shape, "colour": o.colour, "motion": o.motion, "size_word": o.size} for o in self.objects]

    def layout(self, rng: np.random.Generator, max_tries: int = 200) -> scenes.Scene:
        """A random scene that shows exactly this spec."""
        return scenes.layout(rng, self.background, self._object_specs(), max_tries=max_tries)

    def noise_layout(self, noise: np.ndarray) -> scenes.Scene | None:
        """The scene this spec shows when generation starts from `noise` (see `scenes.noise_layout`)."""
        return scenes.noise_layout(self.background, self._object_specs(), noise)


def is_heldout_object(o: ObjectPrompt) -> bool:
    return (o.colour, o.shape) in HELDOUT_COLOUR_SHAPE or (o.colour, o.motion) in HELDOUT_COLOUR_MOTION


def is_heldout_spec(spec: PromptSpec) -> bool:
    return any(is_heldout_object(o) for o in spec.objects)


def _random_object(rng: np.random.Generator, colours: list[str], p_size: float) -> ObjectPrompt:
    size = str(rng.choice(list(SIZE_WORDS))) if rng.random() < p_size else None
    return ObjectPrompt(
        shape=str(rng.choice(scenes.SHAPES)),
        colour=str(rng.choice(colours)),
        motion=str(rng.choice(list(scenes.MOTIONS))),
        size=size,
    )


def sample_spec(
    rng: np.random.Generator, split: str = "train", *, p_two: float = 0.5, p_size: float = 0.3
) -> PromptSpec:
    """A random spec. "train": no held-out combination; "heldout": the first object has one."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    n = 2 if rng.random() < p_two else 1
    objects: list[ObjectPrompt] = []
    while len(objects) < n:
        colours = [c for c in scenes.COLOURS if c not in {o.colour for o in objects}]
        obj = _random_object(rng, colours, p_size)
        if split == "heldout" and not objects:
            if not is_heldout_object(obj):
                continue
        elif is_heldout_object(obj) and split == "train":
            continue
        objects.append(obj)
    if split == "heldout":  # the held-out object is not always named first
        objects = [objects[i] for i in rng.permutation(len(objects))]
    spec = PromptSpec(background=str(rng.choice(list(scenes.BACKGROUNDS))), objects=tuple(objects))
    if len(objects) > 1 and not feasible(spec):
        return sample_spec(rng, split, p_two=p_two, p_size=p_size)
    return spec


def feasible(spec: PromptSpec, tries: int = 50, min_rate: float = 0.1) -> bool:
    """Whether random layouts of the spec put its objects apart often enough (two large crossing movers may
    never fit); at >= 10% per try, `layout`'s 200 tries fail with probability < 1e-9."""
    rng = np.random.default_rng(0)
    ok = 0
    for _ in range(tries):
        try:
            spec.layout(rng, max_tries=1)
            ok += 1
        except ValueError:
            pass
    return ok >= min_rate * tries


# The parts of a wording that have held-out variants (`realize(..., parts=...)`): the scene template and object form,
# and the synonyms of each attribute.
WORDING_PARTS = ("templates", "colour", "shape", "motion", "background", "size")


def realize(
    rng: np.random.Generator,
    spec: PromptSpec,
    split: str = "train",
    *,
    p_word: float = 0.5,
    parts: Collection[str] = WORDING_PARTS,
) -> str:
    """Word a spec. "train" uses only training templates and synonyms; "heldout" uses held-out ones with
    probability `p_word` each (template, object form and every word independently), for the wording `parts` given
    (the others keep training wordings: to measure what each part costs a model)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    unknown = set(parts) - set(WORDING_PARTS)
    if unknown:
        raise ValueError(f"parts: unknown wording parts {sorted(unknown)}; expected some of {WORDING_PARTS}")

    def pick(pair, part):
        train, heldout = pair
        return str(rng.choice(heldout if split == "heldout" and part in parts and rng.random() < p_word else train))

    phrases = []
    for o in spec.objects:
        size = pick(SIZE_WORDS[o.size], "size") + " " if o.size else ""
        form = pick(OBJECT_FORMS, "templates")
        phrase = form.format(
            size=size,
            colour=pick(COLOUR_WORDS[o.colour], "colour"),
            shape=pick(SHAPE_WORDS[o.shape], "shape"),
            motion=pick(MOTION_WORDS[o.motion], "motion"),
        )
        phrases.append(phrase)
    template = pick(SCENE_TEMPLATES, "templates")
    bg = pick(BACKGROUND_WORDS[spec.background], "background")
    text = template.format(objs=" and ".join(phrases), bg=bg)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def training_prompt(rng: np.random.Generator) -> tuple[PromptSpec, str]:
    spec = sample_spec(rng, "train")
    return spec, realize(rng, spec, "train")


def heldout_prompt(rng: np.random.Generator, *, p_word: float = 0.5) -> tuple[PromptSpec, str]:
    spec = sample_spec(rng, "heldout")
    return spec, realize(rng, spec, "heldout", p_word=p_word)


def heldout_prompts(n: int, seed: int = 1234, *, p_word: float = 0.5) -> list[tuple[PromptSpec, str]]:
    """The fixed evaluation set: `n` held-out prompts, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [heldout_prompt(rng, p_word=p_word) for _ in range(n)]


# ---- vocabularies: every wording ever used, for the parser and for tests ------------------------------------


def vocabulary(split: str = "all") -> dict[str, set[str]]:
    """Per attribute, the words of `split` ("train", "heldout" or "all")."""
    out: dict[str, set[str]] = {}
    for name, table in (
        ("colour", COLOUR_WORDS),
        ("shape", SHAPE_WORDS),
        ("motion", MOTION_WORDS),
        ("background", BACKGROUND_WORDS),
        ("size", SIZE_WORDS),
    ):
        words: set[str] = set()
        for train, heldout in table.values():
            words |= set(train) if split in ("train", "all") else set()
            words |= set(heldout) if split in ("heldout", "all") else set()
        out[name] = words
    return out


def _lexicon(table: dict) -> list[tuple[str, str]]:
    pairs = [(w, value) for value, (train, heldout) in table.items() for w in (*train, *heldout)]
    return sorted(pairs, key=lambda p: -len(p[0]))  # longest first: "snow-white" before "white"


_BG_CUES = r"(?:background|backdrop|wall|canvas)"


def _find(text: str, table: dict) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, value) matches of a table's words in text, longest words first."""
    taken: list[tuple[int, int, str]] = []
    for word, value in _lexicon(table):
        for m in re.finditer(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text):
            if all(m.end() <= s or m.start() >= e for s, e, _ in taken):
                taken.append((m.start(), m.end(), value))
    return sorted(taken)


def parse(prompt: str) -> PromptSpec | None:
    """Read a prompt of this world back into its spec; None when it names no shape or no background."""
    text = " ".join(prompt.lower().replace(",", " , ").replace(":", " : ").split())
    bgs = _find(text, BACKGROUND_WORDS)
    if not bgs:
        return None
    # the background word nearest a background cue word, else the last one
    cue = [m.start() for m in re.finditer(_BG_CUES, text)]
    s, e, background = min(bgs, key=lambda b: min((abs(c - b[1]) for c in cue), default=-b[0]))
    rest = text[:s] + " " + text[e:]
    objects = []
    for part in re.split(r"\band\b", rest):
        shapes = _find(part, SHAPE_WORDS)
        if len(shapes) != 1:
            continue
        colours, motions, sizes = _find(part, COLOUR_WORDS), _find(part, MOTION_WORDS), _find(part, SIZE_WORDS)
        if not colours or not motions:
            continue
        objects.append(ObjectPrompt(shapes[0][2], colours[0][2], motions[0][2], sizes[0][2] if sizes else None))
    if not objects:
        return None
    return PromptSpec(background=background, objects=tuple(objects))


def attributes(spec: PromptSpec) -> list[tuple[str, object]]:
    """The attributes a prompt asks for, as (attribute, value) pairs; per object (colour, shape, motion,
    size when named), plus background and count."""
    out: list[tuple[str, object]] = [("background", spec.background), ("count", len(spec.objects))]
    for o in spec.objects:
        out += [("colour", o.colour), ("shape", (o.colour, o.shape)), ("motion", (o.colour, o.motion))]
        if o.size:
            out.append(("size", (o.colour, o.size)))
    return out
