"""`chorus serve --replicas 2`: a real `chorus serve` process running two model replicas on its own local Ray Serve
over a real redis-server, the tiny Wan pipeline in each. One such process serves the whole module (Ray starts
slowly); the restart test runs last, stops it with SIGTERM and starts it again on the same Redis."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from .conftest import TINY_EXTRA, TINY_JOB, ServerProcess

pytestmark = pytest.mark.slow

PREFIX = "cluster-test"
MAX_QUEUE = 6


class Cluster:
    def __init__(self, model_dir, redis_server, log_path):
        self.model_dir, self.redis_url, self.log_path = model_dir, redis_server.url, log_path
        self.redis = redis_server.client()
        self.process: ServerProcess | None = None

    def start(self) -> None:
        extra = ["--replicas", "2", "--store", self.redis_url, "--store-prefix", PREFIX, "--max-queue", str(MAX_QUEUE)]
        extra += ["--local-cache-gb", "0.0625"]
        self.process = ServerProcess(self.model_dir, self.log_path.parent / "unused", self.log_path, *extra)
        self.url = self.process.url
        self.process.wait_ready(timeout=300)
        self.wait_ready()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it: the application, the replicas and Ray go down in order."""
        self.process.proc.send_signal(signal.SIGTERM)
        return self.process.proc.wait(180)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def submit(self, prompt: str, **extra) -> str:
        with self.client() as c:
            r = c.post("/v1/videos", json={"prompt": prompt, **TINY_JOB, **TINY_EXTRA, **extra})
            assert r.status_code == 200, r.text
            return r.json()["id"]

    def get(self, video_id: str) -> dict:
        with self.client() as c:
            return c.get(f"/v1/videos/{video_id}").json()

    def wait(self, video_id: str, timeout: float = 240.0, until=("completed", "failed")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            video = self.get(video_id)
            if video["status"] in until:
                return video
            time.sleep(0.05)
        raise TimeoutError(f"{video_id}: {video}")

    def run(self, prompt: str, **extra) -> dict:
        video = self.wait(self.submit(prompt, **extra))
        assert video["status"] == "completed", video
        return video

    def pids(self) -> dict[str, int]:
        """The replicas that are up: heard from lately, and their process still there."""
        with self.client() as c:
            replicas = c.get("/v1/chorus/replicas").json()["data"]
        return {r["id"]: r["pid"] for r in replicas if _exists(r["pid"])}

    def wait_ready(self, replicas: int = 2, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pids()) < replicas:
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.5)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tiny_wan_dir, redis_server, tmp_path_factory):
    c = Cluster(tiny_wan_dir, redis_server, tmp_path_factory.mktemp("cluster") / "serve.log")
    c.start()
    yield c
    if c.process.proc.poll() is None:
        assert c.stop() == 0


# ---- the same API as one process ------------------------------------------------------------------------------

BAD_BODIES = [
    {},
    {"prompt": ""},
    {"prompt": "a cat", "size": "17x16", "seconds": "0.5"},
    {"prompt": "a cat", "size": "99999x99999"},
    {"prompt": "a cat", "seconds": "30"},
    {"prompt": "a cat", "steps": 100000},
    {"prompt": "a cat", "model": "sora-2"},
    {"prompt": "a cat", "cache_policy": "sometimes"},
    {"prompt": "a cat", "colour": "red"},
    {"prompt": "a cat", "guidance_scale": "nan"},
]


def _answers(url: str) -> list:
    with httpx.Client(base_url=url, timeout=30) as c:
        out = [(r.status_code, r.json()) for r in (c.post("/v1/videos", json=body) for body in BAD_BODIES)]
        raw = c.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
        out.append((raw.status_code, raw.json()))
        for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/nope/content", "/v1/videos?limit=0", "/nothing"):
            r = c.get(path)
            out.append((r.status_code, r.json()))
    return out


def test_bad_input_gets_the_same_openai_shaped_errors_as_one_process(cluster, live_server):
    before = cluster.redis.keys(f"{PREFIX}:jobs:j:*")
    ours, single = _answers(cluster.url), _answers(live_server.url)
    # The one-process test server is given the model id "tiny"; `chorus serve` names a model by its directory.
    named = json.loads(json.dumps(ours).replace(f"'{cluster.model_dir.name}'", "'tiny'"))
    assert named == json.loads(json.dumps(single))
    shapes = {(status // 100, tuple(sorted(body["error"]))) for status, body in ours}
    assert shapes == {(4, ("code", "message", "param", "type"))}
    assert cluster.redis.keys(f"{PREFIX}:jobs:j:*") == before  # nothing was queued


# ---- one cache for every replica ------------------------------------------------------------------------------


def test_routing_prefers_the_replica_that_holds_the_source(cluster):
    first = cluster.run("a green square moving up on a black background", seed=4)
    holder = first["chorus"]["replica"]
    assert first["chorus"]["report"]["outcome"] == "miss" and holder in cluster.pids()
    # Without the preference each of these would land on the holder with probability 1/2.
    for prompt in [
        "a green square moving upward on a black background",
        "a green square moving up over a black background",
        "a green square moving up on a black background",
    ]:
        video = cluster.run(prompt, seed=4)
        report = video["chorus"]["report"]
        assert video["chorus"]["replica"] == holder, video["chorus"]
        assert report["outcome"] in ("hit", "exact") and video["chorus"]["source_tier"] == "local", report


def test_a_near_duplicate_on_a_replica_that_did_not_compute_its_source_is_a_hit(cluster):
    source = cluster.run("a yellow circle moving right on a grey background", seed=2)
    computed_by = source["chorus"]["replica"]
    os.kill(cluster.pids()[computed_by], signal.SIGKILL)  # the only local copy goes with it
    near = cluster.run("a yellow circle moving to the right on a grey background", seed=2)
    report = near["chorus"]["report"]
    assert near["chorus"]["replica"] != computed_by
    assert report["outcome"] == "hit" and report["source_id"] == source["id"], report
    assert near["chorus"]["source_tier"] == "shared"
    cluster.wait_ready()


# ---- jobs that survive --------------------------------------------------------------------------------------


def test_a_replica_killed_mid_job_loses_nothing(cluster):
    cluster.wait_ready()
    job = cluster.submit("a white triangle spinning on a blue background", steps=150)
    deadline = time.monotonic() + 120
    while True:
        video = cluster.get(job)
        if video["status"] == "in_progress" and video["progress"] >= 2:
            break
        assert video["status"] in ("queued", "in_progress") and time.monotonic() < deadline, video
        time.sleep(0.02)
    victim = video["chorus"]["replica"]
    os.kill(cluster.pids()[victim], signal.SIGKILL)
    done = cluster.wait(job, timeout=300)
    assert done["status"] == "completed", done
    assert done["chorus"]["replica"] != victim and done["chorus"]["attempts"] == 2
    with cluster.client() as c:
        content = c.get(f"/v1/videos/{job}/content")
    assert content.status_code == 200 and content.content[4:8] == b"ftyp"
    cluster.wait_ready()


def test_delete_cancels_a_job_running_on_any_replica(cluster):
    job = cluster.submit("an orange square sliding down on a white background", steps=200)
    running = cluster.wait(job, until=("in_progress",))
    replica = running["chorus"]["replica"]
    with cluster.client() as c:
        assert c.delete(f"/v1/videos/{job}").json()["deleted"] is True
        assert c.get(f"/v1/videos/{job}").status_code == 404
    key = f"{PREFIX}:metrics:replica:{replica}"
    deadline = time.monotonic() + 30  # the replica learns at its next heartbeat and abandons the job
    while b'status="cancelled"} 1.0' not in (cluster.redis.get(key) or b""):
        assert time.monotonic() < deadline, (cluster.redis.get(key) or b"").decode()[-2000:]
        time.sleep(0.2)
    assert cluster.redis.hlen(f"{PREFIX}:jobs:v:{job}") == 0


def test_a_full_shared_queue_answers_429_with_retry_after(cluster):
    accepted, refused = [], None
    with cluster.client() as c:
        for i in range(MAX_QUEUE + 4):
            r = c.post("/v1/videos", json={"prompt": f"a dot number {i}", **TINY_JOB, **TINY_EXTRA, "steps": 100})
            if r.status_code == 429:
                refused = r
                break
            accepted.append(r.json()["id"])
        assert refused is not None and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        for job in accepted:  # cancelled across replicas, queued or running
            assert c.delete(f"/v1/videos/{job}").status_code == 200


def test_metrics_aggregate_every_replica_with_its_label(cluster):
    time.sleep(3)  # every replica has published its counters since its last job (once a second)
    with cluster.client() as c:
        text = c.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    completed = [s for s in families["chorus_jobs_finished"].samples if s.labels.get("status") == "completed"]
    replicas = {s.labels["replica"] for s in completed if s.name.endswith("_total")}
    assert len(replicas) >= 2  # the jobs above ran on several replicas
    total = sum(s.value for s in completed if s.name.endswith("_total"))
    # A replica publishes its counters right after each job: a SIGKILL (two above) can take at most that one along.
    assert (
        cluster.redis.zcard(f"{PREFIX}:jobs:st:completed") - 2
        <= total
        <= cluster.redis.zcard(f"{PREFIX}:jobs:st:completed")
    )
    assert "chorus_http_requests_total" in text and "chorus_queue_depth" in text


# ---- restart -----------------------------------------------------------------------------------------------


def test_restart_on_the_same_redis_keeps_completed_videos_and_queued_jobs(cluster):
    cluster.wait_ready()
    done = cluster.run("a black circle bouncing on a white background", seed=9)
    queued = [cluster.submit(f"a red square number {i} moving left", steps=40) for i in range(4)]
    assert cluster.stop() == 0  # the whole application, and its Ray, while jobs wait and run
    cluster.start()
    for job in queued:
        video = cluster.wait(job, timeout=300)
        assert video["status"] == "completed", video
    with cluster.client() as c:
        assert c.get(f"/v1/videos/{done['id']}").json()["status"] == "completed"
        assert c.get(f"/v1/videos/{done['id']}/content").status_code == 200
    again = cluster.run("a black circle bouncing on a white background", seed=9)
    assert again["chorus"]["report"]["outcome"] == "exact"  # the cache survived too
