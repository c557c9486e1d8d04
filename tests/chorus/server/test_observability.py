"""/metrics, /healthz, structured JSON logs carrying the job id, and cancelling a running job."""

from __future__ import annotations

import json
import logging
import time

from chorus.logs import JsonFormatter

from .conftest import TINY_EXTRA, TINY_JOB


def _wait(http, video_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = http.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.05)
    raise TimeoutError(video_id)


def _sample(text: str, sample: str) -> float:
    """The value of one exposition line, e.g. 'chorus_cache_hits_total' or 'x_total{a="b"}'."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class _JsonLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))


def test_metrics_count_requests_latency_and_cache_reuse(live_server):
    live_server.wait_idle()
    with live_server.client() as http:
        before = http.get("/metrics").text
        body = {"prompt": "a metrics-minded blue kite", **TINY_JOB, **TINY_EXTRA, "steps": 4, "seed": 9}
        first = _wait(http, http.post("/v1/videos", json=body).json()["id"])
        again = _wait(http, http.post("/v1/videos", json=body).json()["id"])
        off = _wait(http, http.post("/v1/videos", json={**body, "cache_policy": "off"}).json()["id"])
        response = http.get("/metrics")
    after = response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert first["chorus"]["report"]["outcome"] == "miss" and again["chorus"]["report"]["outcome"] == "exact"
    assert off["chorus"]["report"]["outcome"] == "off"

    def delta(sample):
        return _sample(after, sample) - _sample(before, sample)

    assert delta('chorus_http_requests_total{method="POST",route="/v1/videos",status="200"}') == 3
    assert delta('chorus_http_request_duration_seconds_count{method="POST",route="/v1/videos"}') == 3
    assert delta("chorus_jobs_accepted_total") == 3
    assert delta('chorus_jobs_finished_total{status="completed"}') == 3
    assert delta("chorus_cache_misses_total") == 1 and delta("chorus_cache_hits_total") == 1
    assert delta('chorus_cache_lookups_total{outcome="exact"}') == 1
    assert delta('chorus_cache_lookups_total{outcome="off"}') == 1
    assert delta("chorus_steps_saved_total") == 4  # the exact repeat skipped all 4 steps
    assert delta("chorus_steps_computed_total") == 8
    assert delta("chorus_job_duration_seconds_count") == 3
    for name in ("chorus_queue_depth", "chorus_jobs_in_progress", "chorus_cache_entries", "chorus_seconds_saved_total"):
        assert f"\n{name} " in after, name


def test_healthz(live_server):
    with live_server.client() as http:
        r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "tiny"
    assert set(r.json()["jobs"]) == {"queued", "in_progress", "completed", "failed"}


def test_logs_are_json_lines_with_the_job_id(live_server):
    live_server.wait_idle()
    handler = _JsonLines()
    loggers = [logging.getLogger("chorus.server"), logging.getLogger("chorus.server.worker")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with live_server.client() as http:
            video = _wait(http, http.post("/v1/videos", json={"prompt": "a logged lantern", **TINY_JOB}).json()["id"])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    mine = [line for line in handler.lines if line.get("job_id") == video["id"]]
    messages = [line["message"] for line in mine]
    for expected in ("job accepted", "request", "job started", "job completed"):
        assert expected in messages, messages
    done = next(line for line in mine if line["message"] == "job completed")
    assert done["outcome"] == video["chorus"]["report"]["outcome"] and done["seconds"] > 0
    assert all({"time", "level", "logger", "message"} <= set(line) for line in handler.lines)


def test_deleting_a_running_job_cancels_it(live_server):
    live_server.wait_idle()
    with live_server.client() as http:
        body = {"prompt": "a very long slow sunrise", **TINY_JOB, "steps": 200, "guidance_scale": 1.0}
        video_id = http.post("/v1/videos", json=body).json()["id"]
        deadline = time.monotonic() + 60
        while (video := http.get(f"/v1/videos/{video_id}").json())["progress"] == 0:
            assert video["status"] in ("queued", "in_progress") and time.monotonic() < deadline
            time.sleep(0.02)
        assert video["status"] == "in_progress" and video["progress"] < 100
        assert http.delete(f"/v1/videos/{video_id}").json()["deleted"]
        assert http.get(f"/v1/videos/{video_id}").status_code == 404
        # The worker abandons it at its next step and takes the next job at once.
        quick = http.post("/v1/videos", json={"prompt": "next in line", **TINY_JOB, **TINY_EXTRA}).json()
        assert _wait(http, quick["id"])["status"] == "completed"
    cancelled = live_server.app.state.metrics.registry.get_sample_value(
        "chorus_jobs_finished_total", {"status": "cancelled"}
    )
    assert cancelled and cancelled >= 1
    assert not live_server.worker.video_path(video_id).exists()
    assert live_server.store.get(video_id) is None


def test_a_failing_generation_fails_the_job_not_the_worker(live_server, monkeypatch):
    live_server.wait_idle()
    engine = live_server.worker.engine

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    with live_server.client() as http:
        monkeypatch.setattr(engine, "generate", broken)
        failed = _wait(http, http.post("/v1/videos", json={"prompt": "doomed", **TINY_JOB, **TINY_EXTRA}).json()["id"])
        monkeypatch.undo()
        assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
        assert "out of memory (simulated)" in failed["error"]["message"]
        assert http.get(f"/v1/videos/{failed['id']}/content").status_code == 409
        fine = _wait(http, http.post("/v1/videos", json={"prompt": "fine", **TINY_JOB, **TINY_EXTRA}).json()["id"])
        assert fine["status"] == "completed"
    assert live_server.app.state.metrics.registry.get_sample_value("chorus_jobs_finished_total", {"status": "failed"})


def test_models_and_info_show_family_device_and_dtype(live_server):
    with live_server.client() as client:
        model = client.get("/v1/models").json()["data"][0]
        info = client.get("/v1/chorus/info").json()
    assert (model["family"], model["device"], model["dtype"]) == ("wan2.1", "cpu", "float32")
    assert (info["family"], info["device"], info["dtype"]) == ("wan2.1", "cpu", "float32")
