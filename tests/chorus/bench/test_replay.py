"""A tiny trace through every policy on the tiny random Wan pipeline: the report has every field, `none` reuses
nothing and makes exactly N transformer calls per request, and reuse shows where the trace repeats itself."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from chorus.bench import replay
from chorus.bench.main import run_benchmark
from chorus.bench.policies import known_policies, make_policy
from chorus.bench.report import REQUIRED_FIELDS, markdown
from chorus.bench.trace import TraceConfig, TraceRequest, generate_trace, write_trace
from chorus.cli import main

STEPS = 4
TINY = {"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 1.0}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: fewer threads are faster and steadier here
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def short_adapter(tiny_wan_dir):
    """The tiny pipeline with a short text length: the 512-token default makes the text encoder the whole cost."""
    from chorus.models import load_adapter

    adapter = load_adapter(tiny_wan_dir)
    adapter.defaults = dataclasses.replace(adapter.defaults, max_sequence_length=24)
    return adapter


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    cfg = TraceConfig(requests=6, seed=4, mix={"fresh": 0.2, "paraphrase": 0.2, "edit": 0.3, "repeat": 0.3})
    trace = generate_trace(cfg)
    assert {r.kind for r in trace} == {"fresh", "paraphrase", "edit", "repeat"}
    return write_trace(tmp_path_factory.mktemp("trace") / "tiny.jsonl", trace, cfg)


@pytest.mark.slow  # every policy, MagCache calibration included
def test_every_policy_runs_and_reports_every_field(short_adapter, embedder, tiny_trace, tmp_path, one_thread):
    settings = replay.BenchSettings(generate_kwargs=TINY, progress=False)
    out = run_benchmark(
        tiny_trace,
        known_policies(),
        adapter=short_adapter,
        embedder=embedder,
        steps=STEPS,
        settings=settings,
        report_path=tmp_path / "out.json",
        plots_dir=tmp_path / "plots",
        log=None,
    )
    on_disk = json.loads((tmp_path / "out.json").read_text())
    assert set(on_disk["policies"]) == set(known_policies())
    for key in ("machine", "versions", "settings"):
        assert on_disk[key], key
    assert on_disk["settings"]["steps"] == STEPS and on_disk["settings"]["requests"] == 6
    for name, p in on_disk["policies"].items():
        missing = [f for f in REQUIRED_FIELDS if f not in p or p[f] is None]
        assert not missing, (name, missing)
        assert p["requests"] == 6 and len(p["per_request"]) == 6
        assert p["wall_s"] > 0 and p["throughput_rps"] > 0 and p["latency_p50_s"] <= p["latency_p99_s"]
        assert 0 <= p["hit_rate"] <= 1 and 0 <= p["alignment"] <= 100 and p["fidelity_psnr"] > 0

    none = on_disk["policies"]["none"]
    assert none["hit_rate"] == 0 and none["fidelity_psnr"] == 100.0
    assert [r["transformer_calls"] for r in none["per_request"]] == [STEPS] * 6
    assert none["transformer_calls"] == STEPS * 6
    for name in ("fbc", "taylorseer", "magcache"):  # intra-request caches skip blocks inside calls, never calls
        assert out["policies"][name]["hit_rate"] == 0 and out["policies"][name]["transformer_calls"] == STEPS * 6
    for name in ("exact", "nirvana", "chorus", "chorus+best"):  # the trace repeats a prompt exactly: that is reused
        p = out["policies"][name]
        assert p["hit_rate"] > 0 and p["transformer_calls"] < STEPS * 6 and p["steps_saved"] > 0
    # `exact` serves exact repeats and computes everything else in full, exactly as `none` does
    exact = out["policies"]["exact"]["per_request"]
    assert {r["outcome"] for r in exact} == {"exact", "miss"}
    assert all(r["psnr"] == 100.0 for r in exact)  # identical frames to `none`'s, served or computed
    assert out["policies"]["exact"]["alignment"] == none["alignment"]  # the same frames score the same
    # A served repeat does no denoising: it takes a fraction of a computed request's time. (On this tiny pipeline
    # the misses' embedding and storing cost more than the two repeats save, so no speed-up over `none` is asserted.)
    served = np.median([r["service_s"] for r in exact if r["outcome"] == "exact"])
    computed = np.median([r["service_s"] for r in exact if r["outcome"] == "miss"])
    assert served < 0.5 * computed, (served, computed)
    assert out["policies"]["chorus+best"]["intra_chosen"] in ("fbc", "taylorseer", "magcache")
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"speed_vs_alignment.png", "reuse.png"}
    table = markdown(out)
    assert all(f"| {name}" in table for name in known_policies())


def test_cli_bench_writes_report_and_summary(tiny_wan_dir, tiny_trace, tmp_path, capsys, one_thread):
    code = main(
        [
            "bench",
            "--trace",
            str(tiny_trace),
            "--model",
            str(tiny_wan_dir),
            "--policy",
            "chorus",
            "--steps",
            "2",
            "--limit",
            "2",
            "--height",
            "16",
            "--width",
            "16",
            "--frames",
            "5",
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["policies"]) == ["none", "chorus"]  # none is always the reference
    assert report["policies"]["none"]["transformer_calls"] == 2 * 2 * 2  # CFG: two calls per step
    assert "| chorus |" in capsys.readouterr().out


def test_cli_refuses_bad_arguments(tmp_path, tiny_trace, capsys):
    assert main(["bench", "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["bench", "--trace", str(tiny_trace), "--policy", "teacache"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["trace", "--out", str(tmp_path / "t.jsonl"), "--requests", "0"]) == 2


def test_cli_trace(tmp_path, capsys):
    assert main(["trace", "--out", str(tmp_path / "t.jsonl"), "--requests", "40", "--rate", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == 40 and sum(summary["kinds"].values()) == 40


def test_queue_latencies_and_psnr():
    trace = [TraceRequest("p", 0, "fresh", 0, arrival_s=t) for t in (0.0, 0.5, 5.0)]
    assert replay.queue_latencies(trace, [1.0, 1.0, 1.0]) == [1.0, 1.5, 1.0]  # the second waits for the first
    no_arrivals = [TraceRequest("p", 0, "fresh", 0)] * 2
    assert replay.queue_latencies(no_arrivals, [0.3, 0.4]) == [0.3, 0.4]
    a = np.zeros((2, 4, 4, 3), np.float32)
    assert replay.psnr(a, a) == 100.0 and replay.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-3)


def test_the_alignment_delta_comes_with_its_paired_confidence_interval():
    assert replay.paired_ci95([70.0, 80.0], [70.0, 80.0]) == 0.0  # the same videos: no doubt at all
    # one request +10, one -10: a mean of 0, sd 14.14, standard error 10
    assert replay.paired_ci95([80.0, 70.0, None], [70.0, 80.0, 50.0]) == pytest.approx(19.6)
    assert replay.paired_ci95([80.0], [70.0]) is None  # one pair says nothing of the spread
    out = {
        "settings": {},
        "machine": {},
        "policies": {
            name: {
                "requests": 2,
                "wall_s": 1.0,
                "throughput_rps": 2.0,
                "speedup_vs_none": 1.0,
                "latency_p50_s": 0.5,
                "latency_p99_s": 0.5,
                "hit_rate": 0.0,
                "transformer_calls": 8,
                "alignment": a,
                "fidelity_psnr": None,
                "alignment_ci95": ci,
            }
            for name, a, ci in (("none", 70.0, None), ("chorus", 71.0, 2.5))
        },
    }
    assert "| +1.0 ± 2.5 |" in markdown(out, with_context=False)


def test_policy_order_and_choice_of_the_best_intra_cache():
    assert replay.order_policies(["chorus+best", "chorus", "fbc"]) == ["none", "chorus", "fbc", "chorus+best"]
    results = {
        "none": {"alignment": 80.0, "throughput_rps": 1.0},
        "fbc": {"alignment": 70.0, "throughput_rps": 3.0},  # fast but loses 10 points
        "taylorseer": {"alignment": 79.0, "throughput_rps": 2.0},
    }
    assert replay.choose_best_intra(results) == "taylorseer"
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("teacache")


def test_policies_take_turns_going_first():
    """Served first after the scoring of a round, a policy measured 25% slower than an identical copy: rounds rotate."""
    from contextlib import contextmanager

    from chorus.bench.policies import Policy

    order = []

    class Runner:
        @contextmanager
        def session(self, policy):
            def serve(req):
                order.append(policy.name)
                return {"outcome": "off", "transformer_calls": 1}, np.zeros((1, 2, 2, 3), np.float32)

            yield serve

    trace = [TraceRequest("a red circle moving left on a white background", i, "fresh", i) for i in range(3)]
    policies = [Policy("none"), Policy("a"), Policy("b")]
    records, frames, diversity = replay.replay_interleaved(policies, trace, Runner(), None, progress=False)
    assert order == ["none", "a", "b", "a", "b", "none", "b", "none", "a"]
    assert len(frames) == 3 and all(len(r) == 3 for r in records.values()) and diversity == {}
    assert all(r.psnr == 100.0 for rs in records.values() for r in rs)  # scored against none even when it ran last
