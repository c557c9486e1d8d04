"""`chorus serve --replicas`: two model replicas on a real local Ray Serve over a real redis-server, the tiny Wan
pipeline in each. One Ray instance and one application serve the whole module (Ray starts slowly); the restart
test runs last and deploys the application again on the same Redis."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from .conftest import HOST, TINY_EXTRA, TINY_JOB, free_port

pytestmark = pytest.mark.slow

LEASE_S = 3.0


class Cluster:
    def __init__(self, url: str, settings, redis_client):
        self.url, self.settings, self.redis = url, settings, redis_client

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

    def wait(self, video_id: str, timeout: float = 180.0, until=("completed", "failed")) -> dict:
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
        with self.client() as c:
            return {r["id"]: r["pid"] for r in c.get("/v1/chorus/replicas").json()["data"]}

    def wait_ready(self, replicas: int = 2, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.get("/healthz").status_code == 200 and len(self.live()) >= replicas:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the cluster did not come up")

    def live(self) -> list[str]:
        from ray import serve

        status = serve.status().applications.get("chorus")
        if status is None or status.status != "RUNNING":
            return []
        return list(self.pids())


def deploy(settings):
    from ray import serve

    from chorus.server.cluster import build_application

    serve.run(build_application(settings), name="chorus", route_prefix="/", blocking=False)


@pytest.fixture(scope="module")
def cluster(tiny_wan_dir, redis_server):
    import ray
    from ray import serve

    from chorus.server.cluster import ClusterSettings

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    settings = ClusterSettings(
        model=str(tiny_wan_dir),
        redis_url=redis_server.url,
        prefix="cluster-test",
        replicas=2,
        model_id="tiny",
        max_queue=6,
        cache_bytes=1 << 30,
        local_cache_bytes=64 << 20,
        threads=1,
        cpus_per_replica=1.0,
        lease_s=LEASE_S,
        imbalanced_threshold=0,
    )
    deploy(settings)
    c = Cluster(f"http://{HOST}:{port}", settings, redis_server.client())
    c.wait_ready()
    yield c
    serve.shutdown()
    ray.shutdown()


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
    before = cluster.redis.keys("cluster-test:jobs:j:*")
    ours, single = _answers(cluster.url), _answers(live_server.url)
    assert ours == single
    shapes = {(status // 100, tuple(sorted(body["error"]))) for status, body in ours}
    assert shapes == {(4, ("code", "message", "param", "type"))}
    assert cluster.redis.keys("cluster-test:jobs:j:*") == before  # nothing was queued


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
    job = cluster.submit("an orange square sliding down on a white background", steps=150)
    running = cluster.wait(job, until=("in_progress",))
    replica = running["chorus"]["replica"]
    with cluster.client() as c:
        assert c.delete(f"/v1/videos/{job}").json()["deleted"] is True
        assert c.get(f"/v1/videos/{job}").status_code == 404
    key = f"cluster-test:metrics:replica:{replica}"
    deadline = time.monotonic() + 30  # the replica learns at its next heartbeat and abandons the job
    while b'status="cancelled"} 1.0' not in (cluster.redis.get(key) or b""):
        assert time.monotonic() < deadline, (cluster.redis.get(key) or b"").decode()[-2000:]
        time.sleep(0.2)
    assert cluster.redis.hlen(f"cluster-test:jobs:v:{job}") == 0


def test_a_full_shared_queue_answers_429_with_retry_after(cluster):
    accepted, refused = [], None
    with cluster.client() as c:
        for i in range(cluster.settings.max_queue + 4):
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
    time.sleep(2 * LEASE_S / 10 + 0.5)  # every replica has published its counters since its last job
    with cluster.client() as c:
        text = c.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    completed = [s for s in families["chorus_jobs_finished"].samples if s.labels.get("status") == "completed"]
    replicas = {s.labels["replica"] for s in completed if s.name.endswith("_total")}
    assert len(replicas) >= 2  # the jobs above ran on several replicas
    total = sum(s.value for s in completed if s.name.endswith("_total"))
    assert total >= cluster.redis.zcard("cluster-test:jobs:st:completed") - 1  # at most one lost to a SIGKILL
    assert "chorus_http_requests_total" in text and "chorus_queue_depth" in text


# ---- restart -----------------------------------------------------------------------------------------------


def test_restart_on_the_same_redis_keeps_completed_videos_and_queued_jobs(cluster):
    from ray import serve

    cluster.wait_ready()
    done = cluster.run("a black circle bouncing on a white background", seed=9)
    queued = [cluster.submit(f"a red square number {i} moving left", steps=40) for i in range(4)]
    serve.delete("chorus")  # the whole application: ingress and replicas
    deploy(cluster.settings)
    cluster.wait_ready()
    for job in queued:
        video = cluster.wait(job, timeout=300)
        assert video["status"] == "completed", video
    with cluster.client() as c:
        assert c.get(f"/v1/videos/{done['id']}").json()["status"] == "completed"
        assert c.get(f"/v1/videos/{done['id']}/content").status_code == 200
    again = cluster.run("a black circle bouncing on a white background", seed=9)
    assert again["chorus"]["report"]["outcome"] == "exact"  # the cache survived too
