"""Bad input, field by field: a 4xx in the OpenAI error shape, a message that names the problem, nothing written."""

from __future__ import annotations

import pytest

from chorus.request import MAX_PROMPT_CHARS

from .conftest import TINY_EXTRA, TINY_JOB

GOOD = {"prompt": "a red ball bouncing", **TINY_JOB, **TINY_EXTRA}


def _snapshot(live):
    return (
        sum(live.store.counts().values()),
        sorted(p.name for p in live.worker.videos_dir.iterdir()),
        len(live.app.state.worker.engine.cache),
    )


@pytest.fixture
def http(live_server):
    live_server.wait_idle()
    before = _snapshot(live_server)
    with live_server.client() as client:
        yield client
    assert _snapshot(live_server) == before, "a refused request wrote something"


def _assert_error(r, status: int, param: str | None = None, *words: str):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] and error["code"] and error["message"]
    if param is not None:
        assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


CASES = {
    # field: [(value, words the message must contain)]
    "prompt": [
        ("", "non-empty"),
        ("   ", "non-empty"),
        (123, "string"),
        (["a"], "string"),
        ("x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS)),
    ],
    "model": [("sora-2", "not served"), ("", "not served"), (7, "not served")],
    "seconds": [
        ("0", "greater than 0"),
        ("-1", "greater than 0"),
        ("abc", "number"),
        ("1000", "at most"),
        ("nan", "finite"),
        ("inf", "finite"),
        (True, "boolean"),
        ([4], "number"),
    ],
    "size": [
        ("16", "WIDTHxHEIGHT"),
        ("16x", "WIDTHxHEIGHT"),
        ("0x16", "WIDTHxHEIGHT"),
        ("16X16", "WIDTHxHEIGHT"),
        ("17x16", "multiple of 16"),
        ("16x24", "multiple of 16"),
        ("4096x4096", "pixels"),
        (16, "WIDTHxHEIGHT"),
        ("-16x16", "WIDTHxHEIGHT"),
    ],
    "seed": [
        (-1, "greater than or equal to 0"),
        (2**63, f"less than or equal to {2**63 - 1}"),
        ("abc", "integer"),
        (1.5, "integer"),
        (True, "boolean"),
    ],
    "steps": [
        (0, "greater than or equal to 1"),
        (10_000, "less than or equal to 200"),
        ("x", "integer"),
        (2.5, "integer"),
    ],
    "guidance_scale": [
        (-1, "greater than or equal to 0"),
        (1000, "less than or equal to 50"),
        ("abc", "number"),
        ("nan", "finite"),
    ],
    "negative_prompt": [(123, "string"), ("x" * (MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS))],
    "cache_policy": [("sometimes", "reuse"), (1, "reuse"), ("", "reuse")],
    "input_reference": [("a picture", "not supported")],
}


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [(field, value, words) for field, cases in CASES.items() for value, words in cases],
    ids=lambda v: repr(v)[:20] if not isinstance(v, str) or len(v) > 20 else v,
)
def test_every_field_refuses_bad_values(http, field, value, words):
    r = http.post("/v1/videos", json={**GOOD, field: value})
    _assert_error(r, 400, field, words)


def test_unknown_and_missing_fields(http):
    _assert_error(http.post("/v1/videos", json={**GOOD, "colour": "red"}), 400, "colour", "Unrecognized", "colour")
    _assert_error(http.post("/v1/videos", json={**GOOD, "num_frames": 5}), 400, "num_frames", "Unrecognized")
    missing = {k: v for k, v in GOOD.items() if k != "prompt"}
    _assert_error(http.post("/v1/videos", json=missing), 400, "prompt", "required")


def test_form_bodies_are_checked_the_same_way(http):
    # The openai client sends multipart forms: every value is a string there.
    form = {k: str(v) for k, v in GOOD.items()}
    _assert_error(
        http.post("/v1/videos", files={**{k: (None, v) for k, v in form.items()}, "seed": (None, "-3")}),
        400,
        "seed",
        "greater than or equal to 0",
    )
    _assert_error(http.post("/v1/videos", files={"prompt": (None, "a ball"), "foo": (None, "1")}), 400, "foo")
    upload = {"prompt": (None, "a ball"), "input_reference": ("ref.png", b"\x89PNG", "image/png")}
    _assert_error(http.post("/v1/videos", files=upload), 400, "input_reference", "not supported")
    _assert_error(http.post("/v1/videos", data={**form, "steps": "many"}), 400, "steps", "integer")
    dup = "prompt=a&prompt=b"
    r = http.post("/v1/videos", content=dup, headers={"content-type": "application/x-www-form-urlencoded"})
    _assert_error(r, 400, "prompt", "more than once")


def test_malformed_bodies(http):
    json_type = {"content-type": "application/json"}
    _assert_error(http.post("/v1/videos", content=b"{not json", headers=json_type), 400, None, "JSON")
    _assert_error(http.post("/v1/videos", content=b"[1, 2]", headers=json_type), 400, None, "object")
    _assert_error(http.post("/v1/videos", content=b"", headers=json_type), 400, None, "empty")
    _assert_error(http.post("/v1/videos", content=b"\xff\xfe", headers=json_type), 400, None, "JSON")
    _assert_error(http.post("/v1/videos", content=b"prompt", headers={"content-type": "text/plain"}), 415)
    bad_multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    _assert_error(http.post("/v1/videos", content=b"garbage", headers=bad_multipart), 400)


def test_bodies_over_the_limit_are_refused_unread(http):
    big = {**GOOD, "prompt": "x" * 100_000}
    _assert_error(http.post("/v1/videos", json=big), 413, None, "bytes")

    def chunks():  # no Content-Length: the server counts as it reads
        for _ in range(100):
            yield b"x" * 1024

    _assert_error(http.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize(
    "video_id",
    ["abc", "video_" + "0" * 32, "video_" + "g" * 32, "VIDEO_" + "0" * 32, "video_" + "0" * 33, "..%2Fjobs.sqlite"],
)
def test_ids_that_are_not_ours(http, video_id):
    for method, path in [
        ("GET", f"/v1/videos/{video_id}"),
        ("GET", f"/v1/videos/{video_id}/content"),
        ("DELETE", f"/v1/videos/{video_id}"),
    ]:
        _assert_error(http.request(method, path), 404, None)


def test_list_and_content_parameters(http, live_server):
    _assert_error(http.get("/v1/videos", params={"limit": 0}), 400, "limit")
    _assert_error(http.get("/v1/videos", params={"limit": 101}), 400, "limit")
    _assert_error(http.get("/v1/videos", params={"limit": "ten"}), 400, "limit")
    _assert_error(http.get("/v1/videos", params={"order": "sideways"}), 400, "order")
    _assert_error(http.get("/v1/videos", params={"after": "video_" + "0" * 32}), 400, "after")
    done = [j for j in live_server.store.list(limit=100)[0] if j.status == "completed"]
    if done:
        r = http.get(f"/v1/videos/{done[0].id}/content", params={"variant": "spritesheet"})
        _assert_error(r, 400, "variant")


def test_content_of_an_unfinished_job_is_409(live_server):
    live_server.wait_idle()
    live_server.worker.paused.set()
    try:
        with live_server.client() as http:
            video = http.post("/v1/videos", json=GOOD).json()
            _assert_error(http.get(f"/v1/videos/{video['id']}/content"), 409, "video_id", "queued")
            assert http.delete(f"/v1/videos/{video['id']}").status_code == 200
    finally:
        live_server.worker.paused.clear()


def test_unknown_routes_and_methods(http):
    _assert_error(http.get("/v1/nothing"), 404)
    _assert_error(http.put("/v1/videos", json=GOOD), 405)
    _assert_error(http.post("/v1/videos/video_" + "0" * 32, json=GOOD), 405)
