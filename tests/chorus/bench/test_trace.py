"""The trace generator: reproducible from its seed, and the requested mix of fresh, paraphrased, edited and repeated
prompts with Zipf-like topic popularity."""

from __future__ import annotations

import json

import pytest

from chorus.bench.trace import (
    KINDS,
    STANDARD_TRACE,
    TraceConfig,
    generate_trace,
    read_trace,
    summarize,
    write_trace,
)
from chorus.world import prompts


def _lines(trace):
    return [json.dumps(r.to_json()) for r in trace]


def test_same_seed_same_trace_other_seed_other_trace():
    a = generate_trace(TraceConfig(requests=120, seed=7, rate_rps=2.0))
    b = generate_trace(TraceConfig(requests=120, seed=7, rate_rps=2.0))
    c = generate_trace(TraceConfig(requests=120, seed=8, rate_rps=2.0))
    assert _lines(a) == _lines(b)
    assert _lines(a) != _lines(c)


@pytest.mark.parametrize(
    "mix",
    [
        {"fresh": 0.25, "paraphrase": 0.30, "edit": 0.25, "repeat": 0.20},
        {"fresh": 0.6, "paraphrase": 0.1, "edit": 0.1, "repeat": 0.2},
    ],
)
def test_trace_shows_the_requested_mix(mix):
    n = 400
    trace = generate_trace(TraceConfig(requests=n, seed=3, mix=mix))
    kinds = summarize(trace)["kinds"]
    assert sum(kinds.values()) == n
    for kind in KINDS:  # binomial counts: within ~3.5 standard deviations of the request
        assert abs(kinds[kind] - mix[kind] * n) <= 0.075 * n, (kind, kinds)


def test_kinds_mean_what_they_say():
    trace = generate_trace(TraceConfig(requests=300, seed=11))
    assert trace[0].kind == "fresh"
    for i, r in enumerate(trace):
        spec = prompts.parse(r.prompt)
        assert spec is not None, r.prompt  # every prompt is one the world's analyzer can score
        if r.kind == "fresh":
            assert r.parent is None and r.topic == max(t.topic for t in trace[: i + 1])
            continue
        parent = trace[r.parent]
        assert r.parent < i and parent.topic == r.topic
        if r.kind == "repeat":
            assert (r.prompt, r.seed) == (parent.prompt, parent.seed)
        elif r.kind == "edit":
            before, after = prompts.attributes(prompts.parse(parent.prompt)), prompts.attributes(spec)
            changed = [a for a, b in zip(before, after, strict=True) if a != b]
            # one attribute changed; a colour edit also renames that object's shape and motion pairs
            assert changed and len({name for name, _ in changed} - {"shape", "motion", "size"}) <= 1, changed
            assert len(set(r.prompt.split()) ^ set(parent.prompt.split())) <= 6  # the same wording around it
        else:
            assert r.prompt != parent.prompt or r.seed != parent.seed


def test_topic_popularity_is_zipf_like():
    skewed = summarize(generate_trace(TraceConfig(requests=400, seed=5, zipf_s=1.2)))
    flat = summarize(generate_trace(TraceConfig(requests=400, seed=5, zipf_s=0.0)))
    assert skewed["top_topic_share"] > 2 * flat["top_topic_share"]
    assert skewed["top10_topic_share"] > 0.5
    assert skewed["singleton_topics"] > 0.3 * skewed["topics"]  # a long tail visited once


def test_heldout_knob_picks_the_split():
    heldout = generate_trace(TraceConfig(requests=60, seed=2, heldout=1.0, mix={"fresh": 1.0}))
    train = generate_trace(TraceConfig(requests=60, seed=2, heldout=0.0, mix={"fresh": 1.0}))
    assert all(prompts.is_heldout_spec(prompts.parse(r.prompt)) for r in heldout)
    assert not any(prompts.is_heldout_spec(prompts.parse(r.prompt)) for r in train)


def test_write_read_roundtrip_and_arrivals(tmp_path):
    cfg = TraceConfig(requests=50, seed=1, rate_rps=4.0)
    trace = generate_trace(cfg)
    back = read_trace(write_trace(tmp_path / "t.jsonl", trace, cfg))
    assert _lines(back) == _lines(trace)
    arrivals = [r.arrival_s for r in back]
    assert arrivals == sorted(arrivals) and 5 < arrivals[-1] < 25  # ~50 / 4 rps


def test_read_rejects_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3, "seed": 1}\n')
    with pytest.raises(ValueError, match="string prompt"):
        read_trace(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"trace": {}}\n')
    with pytest.raises(ValueError, match="no requests"):
        read_trace(empty)


def test_standard_trace_is_the_generators_output():
    first = json.loads(STANDARD_TRACE.read_text().splitlines()[0])["trace"]
    cfg = TraceConfig(**first)
    assert 200 <= cfg.requests <= 500
    assert _lines(read_trace(STANDARD_TRACE)) == _lines(generate_trace(cfg))
