"""A real `chorus serve` process killed with SIGKILL mid-work and restarted on the same data dir loses no job."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import pytest

from .conftest import TINY_JOB, ServerProcess

pytestmark = pytest.mark.slow  # restart tests: `make test` runs them, `make test-fast` does not


def _submit(url: str, prompt: str, steps: int) -> str | None:
    """The job id if the server accepted the job; None if the request failed (the server may be dying)."""

    try:
        body = {"prompt": prompt, "steps": steps, "guidance_scale": 1.0, **TINY_JOB}
        r = httpx.post(f"{url}/v1/videos", json=body, timeout=10)
    except httpx.TransportError:
        return None
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _jobs(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/videos", params={"limit": 100, "order": "asc"}, timeout=10)
    r.raise_for_status()
    assert not r.json()["has_more"]
    return {v["id"]: v for v in r.json()["data"]}


def _in_progress(data_dir) -> list[str]:
    """Read the dead server's job store directly: the jobs it was running when it died."""
    with sqlite3.connect(data_dir / "jobs.sqlite") as db:
        return [row[0] for row in db.execute("SELECT id FROM jobs WHERE status = 'in_progress'")]


def test_sigkill_mid_job_and_restart_loses_no_accepted_job(tiny_wan_dir, tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    first = ServerProcess(tiny_wan_dir, data_dir, log)
    try:
        first.wait_ready()
        accepted = [_submit(first.url, f"a quick shape number {i}", 3) for i in range(2)]
        long_job = _submit(first.url, "a slow drifting cloud", 120)  # many steps: the kill lands inside it
        accepted.append(long_job)
        deadline = time.monotonic() + 120
        while [(j := _jobs(first.url))[i]["status"] for i in accepted[:2]] != ["completed"] * 2:
            assert time.monotonic() < deadline, f"the quick jobs did not complete: {j}"
            time.sleep(0.05)
        before = {i: httpx.get(f"{first.url}/v1/videos/{i}/content").content for i in accepted[:2]}
        while (job := _jobs(first.url)[long_job])["status"] != "in_progress" or job["progress"] == 0:
            assert job["status"] in ("queued", "in_progress") and time.monotonic() < deadline, job
            time.sleep(0.02)

        # Keep submitting while the kill happens: whatever was acknowledged must survive it.
        stop = threading.Event()
        during: list[str | None] = []

        def submitter():
            i = 0
            while not stop.is_set() and i < 20:
                during.append(_submit(first.url, f"a late arrival number {i}", 3))
                i += 1

        thread = threading.Thread(target=submitter)
        thread.start()
        while len(during) < 3 and thread.is_alive():
            time.sleep(0.01)
        first.kill()
        stop.set()
        thread.join()
    finally:
        first.stop()
    interrupted = _in_progress(data_dir)
    accepted += [i for i in during if i is not None]
    assert len(accepted) >= 6 and interrupted == [long_job], (accepted, interrupted)

    second = ServerProcess(tiny_wan_dir, data_dir, log)
    try:
        second.wait_ready()
        deadline = time.monotonic() + 120
        while True:
            jobs = _jobs(second.url)
            if all(jobs[i]["status"] in ("completed", "failed") for i in accepted if i in jobs):
                break
            assert time.monotonic() < deadline, "jobs did not finish after the restart"
            time.sleep(0.2)

        assert set(accepted) <= set(jobs), "an accepted job was lost"
        assert all(jobs[i]["status"] == "completed" for i in accepted), {i: jobs[i]["error"] for i in accepted}
        # Completed jobs are still served, byte for byte; the interrupted one ran again, once more.
        for job_id, content in before.items():
            assert httpx.get(f"{second.url}/v1/videos/{job_id}/content").content == content
            assert jobs[job_id]["chorus"]["attempts"] == 1
        for job_id in interrupted:
            assert jobs[job_id]["chorus"]["attempts"] == 2
            assert jobs[job_id]["chorus"]["report"]["request_id"] == f"{job_id}-attempt2"
        for job_id in accepted:
            r = httpx.get(f"{second.url}/v1/videos/{job_id}/content")
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and len(r.content) > 100
        # Nothing half-written is left behind.
        assert not [p for p in (data_dir / "videos").iterdir() if p.name.startswith(".")]
    finally:
        second.stop()
    lines = log.read_text().splitlines()
    assert "interrupted job queued again" in [json.loads(line)["message"] for line in lines]  # all JSON lines
