"""The web page in a real headless browser (Debian's chromium through Playwright): submit a prompt, watch it
complete, see the video element play, and see the page say what a repeat reused."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow  # browser tests: `make test` runs them, `make test-fast` does not

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):  # a missing browser is a failure, not a skip that hides the page going untested
        pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def _submit(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.fill("#size", "16x16")
    page.fill("#seconds", "0.5")
    page.fill("#steps", "3")
    page.fill("#guidance", "1")
    page.click("#submit")


def test_submit_watch_complete_and_play(browser, live_server):
    live_server.wait_idle()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(live_server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#size") == "832x480"  # the model's default, from /v1/chorus/info
    assert "model tiny" in page.text_content("#server-info")

    prompt = "a browser-made orange ball rolling right"
    _submit(page, prompt)
    card = page.locator("li.job", has_text=prompt)
    card.wait_for()
    page.wait_for_selector(f"li.job[data-status=completed]:has-text('{prompt}') video", timeout=60_000)
    assert "completed" in card.locator(".status").text_content()
    assert "No cached request reused" in card.locator(".reuse").text_content()

    # The video element plays: it loads the MP4, decodes frames of the right size, and its clock advances.
    video = card.locator("video")
    played = video.evaluate(
        """async (v) => {
            v.muted = true;
            if (v.readyState < 2) await new Promise((ok, bad) => {
                v.addEventListener("loadeddata", ok, {once: true});
                v.addEventListener("error", () => bad(new Error("media error " + v.error?.code)), {once: true});
            });
            await v.play();
            const start = performance.now();
            while (v.currentTime === 0 && performance.now() - start < 10000) await new Promise(r => setTimeout(r, 50));
            return {time: v.currentTime, width: v.videoWidth, height: v.videoHeight, paused: v.paused,
                    duration: v.duration, error: v.error && v.error.code};
        }"""
    )
    assert played["error"] is None and played["width"] == 16 and played["height"] == 16, played
    assert played["time"] > 0 and played["duration"] > 0, played

    # The same request again is an exact repeat, and the page says which video it reused.
    first_id = card.get_attribute("data-id")
    page.fill("#prompt", "")
    _submit(page, prompt)
    page.wait_for_function(
        "(n) => document.querySelectorAll(`li.job[data-status=completed]`).length >= n",
        arg=2,
        timeout=60_000,
    )
    newest = page.locator("li.job").first
    newest.locator(".reuse.exact").wait_for(timeout=60_000)
    reuse = newest.locator(".reuse").text_content()
    assert "Exact repeat" in reuse and first_id in reuse and "3 steps reused" in reuse

    # Bad input shows the server's message instead of a job.
    jobs_before = page.locator("li.job").count()
    page.fill("#prompt", "a ball")
    page.fill("#size", "17x16")
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "size" in page.text_content("#form-error")
    assert page.locator("li.job").count() == jobs_before
    assert not errors, errors
    page.close()
