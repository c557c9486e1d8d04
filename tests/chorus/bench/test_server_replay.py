"""`chorus bench --server`: the same replay through the OpenAI-compatible API of a live in-process server."""

from __future__ import annotations

import pytest

from chorus.bench import replay
from chorus.bench.main import run_benchmark
from chorus.bench.trace import TraceConfig, generate_trace, write_trace
from tests.chorus.server.conftest import start_live_server, stop_live_server


@pytest.fixture
def server(tiny_wan_dir, tmp_path):
    from chorus.engine import ChorusEngine

    engine = ChorusEngine.from_pretrained(tiny_wan_dir)  # an empty in-memory cache
    live = start_live_server(engine, tmp_path / "data")
    yield live.url
    stop_live_server(live)
    engine.close()


def test_replay_against_a_server(server, tmp_path):
    cfg = TraceConfig(requests=3, seed=2, mix={"repeat": 1.0})  # a fresh prompt, then two exact repeats
    trace = write_trace(tmp_path / "t.jsonl", generate_trace(cfg), cfg)
    settings = replay.BenchSettings(
        generate_kwargs={"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 1.0}, progress=False
    )
    out = run_benchmark(trace, ["chorus"], server=server, steps=2, settings=settings, log=None)
    none, chorus = out["policies"]["none"], out["policies"]["chorus"]
    assert none["hit_rate"] == 0 and none["transformer_calls"] == 3 * 2
    assert chorus["hit_rate"] == pytest.approx(2 / 3) and chorus["transformer_calls"] == 2
    assert chorus["fidelity_psnr"] > 30  # exact repeats are the same video (through MP4 both times)
    with pytest.raises(ValueError, match="cannot be replayed against a server"):
        run_benchmark(trace, ["nirvana"], server=server, settings=settings, log=None)


def test_replay_with_requests_in_flight_times_the_whole_trace(server, tmp_path):
    cfg = TraceConfig(requests=4, seed=3, mix={"fresh": 1.0})
    trace = write_trace(tmp_path / "t.jsonl", generate_trace(cfg), cfg)
    settings = replay.BenchSettings(
        generate_kwargs={"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 1.0}, progress=False
    )
    out = run_benchmark(trace, ["chorus"], server=server, steps=2, settings=settings, log=None, concurrency=2)
    chorus = out["policies"]["chorus"]
    assert list(out["policies"]) == ["chorus"] and chorus["concurrency"] == 2 and chorus["requests"] == 4
    # Two requests waited on one worker side by side: the trace took less than the sum of their service times.
    assert chorus["wall_s"] < sum(r["service_s"] for r in chorus["per_request"])
