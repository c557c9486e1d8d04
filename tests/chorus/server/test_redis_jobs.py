"""The cluster's job store against a real redis-server: claims, leases, requeues, deletion and listing."""

from __future__ import annotations

import time

import pytest

from chorus.server.jobs import QueueFullError
from chorus.server.redis_jobs import RedisJobStore

JOB = {"model": "tiny", "prompt": "a red circle", "seconds": "0.5", "size": "16x16", "params": {"seed": 1}}


@pytest.fixture
def jobs(redis_server, redis_prefix):
    made = []

    def make(owner=None, **kwargs):
        store = RedisJobStore(redis_server.url, prefix=redis_prefix, owner=owner, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_a_job_is_claimed_once_and_only_its_holder_finishes_it(jobs):
    front, a, b = jobs(max_queue=2), jobs(owner="a"), jobs(owner="b")
    job = front.add(**JOB)
    assert job.status == "queued" and job.params == {"seed": 1} and front.counts()["queued"] == 1
    claimed = a.claim(job.id)
    assert claimed.status == "in_progress" and claimed.replica == "a" and claimed.attempts == 1
    assert b.claim(job.id) is None  # dispatched twice, run once
    assert not b.heartbeat(job.id) and not b.complete(job.id, {"outcome": "miss"})
    a.set_progress(job.id, 40)
    assert front.get(job.id).progress == 40
    a.put_video(job.id, b"mp4", b"png")
    assert a.complete(job.id, {"outcome": "miss"})
    done = front.get(job.id)
    assert done.status == "completed" and done.report == {"outcome": "miss"} and done.progress == 100
    assert front.video(job.id, "video") == b"mp4" and front.video(job.id, "thumbnail") == b"png"
    assert front.counts() == {"queued": 0, "in_progress": 0, "completed": 1, "failed": 0}


def test_a_full_queue_refuses_and_a_lost_lease_requeues_then_fails(jobs):
    front, a = jobs(max_queue=1), jobs(owner="a", lease_s=0.2)
    job = front.add(**JOB)
    with pytest.raises(QueueFullError):
        front.add(**JOB)
    for attempt in range(1, 4):
        assert a.claim(job.id).attempts == attempt
        assert front.release_expired() == []  # the lease still runs
        time.sleep(0.3)  # no heartbeat: the replica is gone
        expected = "queued" if attempt < 3 else "failed"
        assert front.release_expired() == [(job.id, expected)]
    failed = front.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "interrupted"


def test_a_job_given_up_at_shutdown_is_queued_again_without_an_attempt(jobs):
    front, a = jobs(), jobs(owner="a")
    job = front.add(**JOB)
    a.claim(job.id)
    a.requeue(job.id)
    again = front.get(job.id)
    assert again.status == "queued" and again.attempts == 0 and front.queued_ids() == [job.id]


def test_delete_removes_a_job_and_its_video_whatever_its_state(jobs):
    front, a = jobs(), jobs(owner="a")
    job = front.add(**JOB)
    a.claim(job.id)
    a.put_video(job.id, b"mp4", b"png")
    gone = front.delete(job.id)
    assert gone.status == "in_progress" and front.get(job.id) is None and front.video(job.id, "video") is None
    assert not a.heartbeat(job.id)  # the replica learns it was cancelled
    assert front.delete(job.id) is None and sum(front.counts().values()) == 0


def test_list_pages_in_creation_order(jobs):
    front = jobs(max_queue=10)
    ids = [front.add(**JOB).id for _ in range(5)]
    page, more = front.list(limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and more
    page, more = front.list(after=ids[2], limit=10, order="asc")
    assert [j.id for j in page] == ids[3:] and not more
    with pytest.raises(KeyError):
        front.list(after="video_" + "0" * 32)


def test_the_test_server_is_as_durable_as_the_cluster_asks(jobs):
    assert jobs().durability() == []
