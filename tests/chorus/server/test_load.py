"""Bounded load: 50 requests from 10 concurrent clients against a queue of 8. Every accepted job completes exactly
once; every refused one got a 429 with Retry-After, in the OpenAI error shape."""

from __future__ import annotations

import collections
import logging
import threading
import time

import httpx
import pytest

from .conftest import TINY_EXTRA, TINY_JOB

pytestmark = pytest.mark.slow  # load tests: `make test` runs them, `make test-fast` does not

CLIENTS, PER_CLIENT = 10, 5


class _Completions(logging.Handler):
    def __init__(self):
        super().__init__()
        self.ids: list[str] = []

    def emit(self, record):
        if record.getMessage() == "job completed":
            self.ids.append(record.job_id)


def _metric(live, name: str, labels: dict | None = None) -> float:
    return live.app.state.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_fifty_requests_from_ten_clients(live_server):
    live_server.wait_idle()
    completions = _Completions()
    worker_log = logging.getLogger("chorus.server.worker")
    worker_log.addHandler(completions)
    worker_log.setLevel(logging.INFO)
    finished_before = _metric(live_server, "chorus_jobs_finished_total", {"status": "completed"})
    results: list[tuple[int, dict, httpx.Headers]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(n: int):
        with live_server.client() as http:
            barrier.wait()
            for i in range(PER_CLIENT):
                body = {"prompt": f"client {n} asks for a ball bouncing, take {i}", **TINY_JOB, **TINY_EXTRA}
                r = http.post("/v1/videos", json=body)
                with lock:
                    results.append((r.status_code, r.json(), r.headers))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live_server.wait_idle(timeout=120)
    elapsed = time.perf_counter() - start
    worker_log.removeHandler(completions)

    assert len(results) == CLIENTS * PER_CLIENT
    assert {status for status, _, _ in results} <= {200, 429}
    accepted = [body["id"] for status, body, _ in results if status == 200]
    refused = [(body, headers) for status, body, headers in results if status == 429]
    assert len(accepted) >= 8 and refused, "a queue of 8 must both take and refuse some of 50 quick requests"
    assert len(set(accepted)) == len(accepted)
    for body, headers in refused:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}

    # Exactly once: each accepted job completed, on its first attempt, and the worker finished it one time.
    counted = collections.Counter(completions.ids)
    assert all(counted[job_id] == 1 for job_id in accepted), counted
    assert set(counted) == set(accepted)
    for job_id in accepted:
        job = live_server.store.get(job_id)
        assert job.status == "completed" and job.attempts == 1 and job.progress == 100
        assert live_server.worker.video_path(job_id).is_file()
    assert _metric(live_server, "chorus_jobs_finished_total", {"status": "completed"}) - finished_before == len(
        accepted
    )
    print(f"\nload: {len(accepted)} accepted, {len(refused)} refused (429), {len(accepted) / elapsed:.2f} jobs/s")


def test_a_full_queue_answers_429_with_retry_after_and_writes_nothing(live_server):
    live_server.wait_idle()
    live_server.worker.paused.set()
    try:
        with live_server.client() as http:
            ids = []
            for i in range(live_server.store.max_queue):
                r = http.post("/v1/videos", json={"prompt": f"filling the queue {i}", **TINY_JOB, **TINY_EXTRA})
                assert r.status_code == 200
                ids.append(r.json()["id"])
            counts = live_server.store.counts()
            r = http.post("/v1/videos", json={"prompt": "one too many", **TINY_JOB, **TINY_EXTRA})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert live_server.store.counts() == counts
            health = http.get("/healthz").json()
            assert health["jobs"]["queued"] == live_server.store.max_queue
            metrics = http.get("/metrics").text
            assert f"chorus_queue_depth {float(live_server.store.max_queue)}" in metrics
            assert 'chorus_http_requests_total{method="POST",route="/v1/videos",status="429"}' in metrics
            # Cancelling a queued job frees its place.
            assert http.delete(f"/v1/videos/{ids[0]}").status_code == 200
            r = http.post("/v1/videos", json={"prompt": "now there is room", **TINY_JOB, **TINY_EXTRA})
            assert r.status_code == 200
    finally:
        live_server.worker.paused.clear()
        live_server.worker.wake()
    live_server.wait_idle()
