"""Seeded prompt traces with the structure of real prompt logs, built on the built-in world's prompt generator.

A trace is a JSONL file, one request a line: `{"prompt", "seed", "arrival_s"?}` plus what the generator knows
about the request (`kind`, `topic`, `parent`), which replay ignores and reports read. A first line
`{"trace": {...}}` records the generator's settings; readers skip every line without a prompt.

How a trace is made (every knob is a field of `TraceConfig`):

- Requests come in four kinds, drawn independently with the probabilities `mix`:
  - `fresh`: a new topic: a new scene spec from the world (`sample_spec`), worded anew (`realize`);
  - `paraphrase`: a spec the topic has asked for before, worded anew (another template and other synonyms), with a
    new seed;
  - `edit`: an earlier request of the topic with one attribute changed (an object's colour, shape or motion, or the
    background), worded with the same template and synonyms as that request, so the text differs in one phrase;
    a new seed; the edited spec joins the topic;
  - `repeat`: an earlier request of the topic again, prompt and seed exactly.
  The first request is always fresh (there is no topic to come back to).
- Topics are popular by Zipf's law: a non-fresh request goes to the i-th topic created (0-based) with weight
  `1 / (i + 1) ** zipf_s` among the topics so far, so a few early topics take most of the traffic and a long tail is
  visited once or twice (as in real prompt logs).
- Fairness to the model: a fresh topic comes from the world's held-out split (attribute combinations, templates and
  synonyms the built-in model never saw in training; `p_word` is the share of held-out wordings) with probability
  `heldout`, else from the training split.
- Arrivals: with `rate_rps` set, `arrival_s` follows a Poisson process of that rate; replay then also reports
  latencies with queueing, as if one worker served the trace as it arrived.

The same config (seed included) gives the same trace, byte for byte.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..world import prompts, scenes

KINDS = ("fresh", "paraphrase", "edit", "repeat")
EDITABLE = ("colour", "shape", "motion", "background")
STANDARD_TRACE = Path(__file__).resolve().parent / "traces" / "standard.jsonl"


@dataclass(frozen=True)
class TraceConfig:
    requests: int = 300
    seed: int = 0
    # probabilities of fresh / paraphrase / edit / repeat (normalised)
    mix: dict[str, float] = field(
        default_factory=lambda: {"fresh": 0.25, "paraphrase": 0.30, "edit": 0.25, "repeat": 0.20}
    )
    zipf_s: float = 1.1  # topic popularity exponent; 0 = uniform over topics seen so far
    heldout: float = 1.0  # share of fresh topics from the world's held-out split
    p_word: float = 0.5  # within held-out topics, share of held-out templates and synonyms
    p_two: float = 0.5  # share of specs with two objects
    p_size: float = 0.3  # share of objects with a size word
    rate_rps: float | None = None  # Poisson arrivals at this rate; None: no arrival times

    def __post_init__(self):
        if self.requests < 1:
            raise ValueError("requests must be >= 1")
        unknown = set(self.mix) - set(KINDS)
        if unknown or any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix: non-negative weights over {KINDS}, not all zero (got {self.mix})")
        if self.zipf_s < 0 or not 0 <= self.heldout <= 1 or not 0 <= self.p_word <= 1:
            raise ValueError("need zipf_s >= 0 and heldout, p_word in [0, 1]")
        if self.rate_rps is not None and self.rate_rps <= 0:
            raise ValueError("rate_rps must be positive")

    def probabilities(self) -> np.ndarray:
        p = np.array([self.mix.get(k, 0.0) for k in KINDS], dtype=float)
        return p / p.sum()


@dataclass
class TraceRequest:
    prompt: str
    seed: int
    kind: str
    topic: int
    parent: int | None = None  # index of the request this one paraphrases, edits or repeats
    arrival_s: float | None = None
    attribute: str | None = None  # what an edit changed: one of EDITABLE

    def to_json(self) -> dict:
        d = {"prompt": self.prompt, "seed": self.seed}
        if self.arrival_s is not None:
            d["arrival_s"] = round(self.arrival_s, 4)
        d.update(kind=self.kind, topic=self.topic, parent=self.parent)
        if self.attribute is not None:
            d["attribute"] = self.attribute
        return d


@dataclass
class _Variant:
    spec: prompts.PromptSpec
    split: str
    wording: int  # seed of the realisation: the same seed words an edited spec the same way


def _words(rng_seed: int, spec: prompts.PromptSpec, split: str, p_word: float) -> str:
    return prompts.realize(np.random.default_rng(rng_seed), spec, split, p_word=p_word)


def edit_spec(rng: np.random.Generator, spec: prompts.PromptSpec) -> tuple[prompts.PromptSpec, str]:
    """The spec with one attribute changed to another value: (edited spec, attribute)."""
    for _ in range(100):
        attribute = str(rng.choice(EDITABLE))
        if attribute == "background":
            values = [b for b in scenes.BACKGROUNDS if b != spec.background]
            edited = replace(spec, background=str(rng.choice(values)))
        else:
            i = int(rng.integers(len(spec.objects)))
            obj = spec.objects[i]
            if attribute == "colour":
                taken = {o.colour for o in spec.objects}
                new = replace(obj, colour=str(rng.choice([c for c in scenes.COLOURS if c not in taken])))
            elif attribute == "shape":
                new = replace(obj, shape=str(rng.choice([s for s in scenes.SHAPES if s != obj.shape])))
            else:
                new = replace(obj, motion=str(rng.choice([m for m in scenes.MOTIONS if m != obj.motion])))
            edited = replace(spec, objects=(*spec.objects[:i], new, *spec.objects[i + 1 :]))
        if len(edited.objects) == 1 or prompts.feasible(edited):
            return edited, attribute
    raise RuntimeError(f"no feasible single-attribute edit of {spec}")  # pragma: no cover


def generate_trace(config: TraceConfig | None = None) -> list[TraceRequest]:
    cfg = config or TraceConfig()
    rng = np.random.default_rng(cfg.seed)
    probs = cfg.probabilities()
    topics: list[list[_Variant]] = []
    topic_requests: list[list[int]] = []
    variant_of: list[_Variant] = []  # per request
    out: list[TraceRequest] = []
    clock = 0.0
    for index in range(cfg.requests):
        kind = "fresh" if not topics else str(rng.choice(KINDS, p=probs))
        attribute = None
        if kind == "fresh":
            split = "heldout" if rng.random() < cfg.heldout else "train"
            variant = _Variant(
                prompts.sample_spec(rng, split, p_two=cfg.p_two, p_size=cfg.p_size), split, int(rng.integers(2**31))
            )
            topic, parent = len(topics), None
            topics.append([variant])
            topic_requests.append([])
            seed = int(rng.integers(2**31))
        else:
            weights = (np.arange(len(topics)) + 1.0) ** -cfg.zipf_s
            topic = int(rng.choice(len(topics), p=weights / weights.sum()))
            parent = int(rng.choice(topic_requests[topic]))
            if kind == "repeat":
                variant, seed = variant_of[parent], out[parent].seed
            elif kind == "paraphrase":
                base = topics[topic][int(rng.integers(len(topics[topic])))]
                variant = _Variant(base.spec, base.split, int(rng.integers(2**31)))
                seed = int(rng.integers(2**31))
            else:
                base = variant_of[parent]
                spec, attribute = edit_spec(rng, base.spec)
                variant = _Variant(spec, base.split, base.wording)
                topics[topic].append(variant)
                seed = int(rng.integers(2**31))
        if kind == "repeat":
            text = out[parent].prompt
        else:
            text = _words(variant.wording, variant.spec, variant.split, cfg.p_word)
        if cfg.rate_rps is not None:
            clock += float(rng.exponential(1.0 / cfg.rate_rps))
        arrival = clock if cfg.rate_rps is not None else None
        out.append(TraceRequest(text, seed, kind, topic, parent, arrival, attribute))
        topic_requests[topic].append(index)
        variant_of.append(variant)
    return out


def summarize(trace: list[TraceRequest]) -> dict:
    """The mix a trace shows: kinds, topics, and how concentrated the traffic is."""
    kinds = Counter(r.kind for r in trace)
    per_topic = sorted(Counter(r.topic for r in trace).values(), reverse=True)
    n = len(trace)
    return {
        "requests": n,
        "kinds": {k: kinds.get(k, 0) for k in KINDS},
        "topics": len(per_topic),
        "top_topic_share": per_topic[0] / n if n else 0.0,
        "top10_topic_share": sum(per_topic[:10]) / n if n else 0.0,
        "singleton_topics": sum(1 for c in per_topic if c == 1),
        "distinct_prompts": len({r.prompt for r in trace}),
    }


def write_trace(path: str | Path, trace: list[TraceRequest], config: TraceConfig | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"trace": asdict(config)}, sort_keys=True)] if config is not None else []
    lines += [json.dumps(r.to_json()) for r in trace]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace; lines without a prompt (the settings line, blanks) are skipped."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if "prompt" not in d:
            continue
        if not isinstance(d["prompt"], str) or not isinstance(d.get("seed", 0), int):
            raise ValueError(f"{path}:{n}: need a string prompt and an integer seed")
        out.append(
            TraceRequest(
                prompt=d["prompt"],
                seed=int(d.get("seed", 0)),
                kind=d.get("kind", "unknown"),
                topic=int(d.get("topic", -1)),
                parent=d.get("parent"),
                arrival_s=d.get("arrival_s"),
                attribute=d.get("attribute"),
            )
        )
    if not out:
        raise ValueError(f"{path}: no requests")
    return out
