"""The official `openai` client, unchanged but for base_url, against a live server on loopback."""

from __future__ import annotations

import warnings

import openai
import pytest

from chorus.video import read_mp4

from .conftest import TINY_EXTRA, TINY_JOB

warnings.filterwarnings("ignore", category=DeprecationWarning)  # the Sora API's deprecation notice


@pytest.fixture
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def test_create_and_poll_then_download_gives_a_playable_mp4(client, live_server, tmp_path):
    video = client.videos.create_and_poll(
        prompt="a red circle moving left on a white background", extra_body={**TINY_EXTRA, "seed": 11}, **TINY_JOB
    )
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert video.id.startswith("video_") and video.model == "tiny"
    assert (video.size, video.seconds) == ("16x16", "0.5")
    assert video.completed_at >= video.created_at
    chorus = video.model_extra["chorus"]
    assert chorus["seed"] == 11 and chorus["steps"] == 3 and chorus["num_frames"] == 5 and chorus["attempts"] == 1
    report = chorus["report"]
    assert report["request_id"] == video.id and report["num_steps"] == 3
    assert report["steps_computed"] + len(report["stage2_steps"]) + report["steps_reused"] == 3

    content = client.videos.download_content(video.id)
    path = tmp_path / "video.mp4"
    content.write_to_file(path)
    frames = read_mp4(path)
    assert frames.shape == (5, 16, 16, 3)  # H.264 decodes back to the 5 frames the model made

    thumb = client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.videos.retrieve(video.id).status == "completed"


def test_an_exact_repeat_and_a_paraphrase_reuse_the_cache(client):
    args = dict(extra_body={"steps": 8, "seed": 5, "guidance_scale": 1.0}, **TINY_JOB)
    first = client.videos.create_and_poll(prompt="a green square moving up on a black background", **args)
    again = client.videos.create_and_poll(prompt="a green square moving up on a black background", **args)
    near = client.videos.create_and_poll(prompt="a green square moving upward on a black background", **args)
    r1, r2, r3 = (v.model_extra["chorus"]["report"] for v in (first, again, near))
    assert r1["outcome"] == "miss"
    assert r2["outcome"] == "exact" and r2["source_id"] == first.id and r2["steps_reused"] == 8
    assert r3["outcome"] == "hit" and r3["source_id"] in (first.id,) and r3["similarity"] > 0.8
    assert r3["steps_computed"] + len(r3["stage2_steps"]) + r3["steps_reused"] == 8 and r3["steps_saved"] > 0
    assert r3["difference"] in ("none", "local") and len(r3["plan"]) == 8
    assert r3["source_prompt"] == "a green square moving up on a black background"


def test_list_is_paginated_newest_first(client):
    ids = [
        client.videos.create(prompt=f"a dot number {i} moving right", extra_body=TINY_EXTRA, **TINY_JOB).id
        for i in range(3)
    ]
    page = client.videos.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    assert [v.id for v in page.data] == ids[::-1][:2]
    listed = [v.id for v in client.videos.list(limit=2)]  # the client follows the cursor through every page
    assert listed[:3] == ids[::-1] and len(listed) == len(set(listed))
    oldest_first = [v.id for v in client.videos.list(order="asc", limit=100)]
    assert oldest_first[-3:] == ids
    for video_id in ids:
        client.videos.poll(video_id, poll_interval_ms=50)


def test_delete_removes_the_video_and_its_file(client, live_server):
    video = client.videos.create_and_poll(prompt="a yellow star spinning", extra_body=TINY_EXTRA, **TINY_JOB)
    path = live_server.worker.video_path(video.id)
    assert path.is_file()
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)


def test_cancelling_a_queued_job(client, live_server):
    live_server.worker.paused.set()  # hold the queue still so the job is surely queued
    try:
        video = client.videos.create(prompt="a purple triangle fading out", extra_body=TINY_EXTRA, **TINY_JOB)
        assert client.videos.retrieve(video.id).status == "queued"
        assert client.videos.delete(video.id).deleted
    finally:
        live_server.worker.paused.clear()
        live_server.worker.wake()
    live_server.wait_idle()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert not live_server.worker.video_path(video.id).exists()


def test_unknown_model_is_refused_by_the_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="a cat", model="sora-2", **TINY_JOB)
    assert info.value.code == "model_not_found" and info.value.param == "model"
