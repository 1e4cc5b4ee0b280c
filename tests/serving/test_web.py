"""The web UI end to end in headless Chromium (Playwright): upload an image, ask, watch the answer stream.

Chromium comes from Debian (``make browser`` installs it; Playwright's own browser download is not used).
Without it the test fails under CI (``CI`` set) and is skipped, with the reason, on a developer machine.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from pathlib import Path

import pytest

from visualglm.serving.worker import GenerationRequest, Worker

from .conftest import TEST_LIMITS, png_bytes, probe

pytest.importorskip("gradio", reason="the web extra is not installed")

CHROMIUM = Path(os.environ.get("VISUALGLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
SEED = 0


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        message = f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def web(visual_model):
    from visualglm.serving.web import launch

    worker = Worker(*visual_model, name="tiny", limits=TEST_LIMITS).start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = launch(worker, host="127.0.0.1", port=port, seed=SEED, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", worker
    finally:
        demo.close()
        worker.stop()


def _expected(worker: Worker, query: str, image_bytes: bytes, history=()) -> str:
    """What the UI should show: the same request through the worker (same seed and slider defaults)."""
    from visualglm.image import load_image

    events: queue.SimpleQueue = queue.SimpleQueue()
    worker.submit(GenerationRequest(query=query, history=list(history), image=load_image(image_bytes),
                                    max_length=2048, max_new_tokens=TEST_LIMITS.max_new_tokens,
                                    sampling={"seed": SEED, "top_p": 0.4, "temperature": 0.8}), events.put)
    parts = []
    while (event := events.get()).kind not in ("done", "error"):
        parts.append(event.text)
    assert event.kind == "done", event
    return "".join(parts)


def _visible(text: str) -> str:
    """Letters and digits only: what Markdown rendering and the browser cannot change."""
    return "".join(ch for ch in text if ch.isalnum())


def _bot_messages(page) -> list[str]:
    return page.locator("#chat .bot").all_inner_texts()


# Records the length of the last answer bubble at every DOM change, in the page itself: streaming is
# observed however slowly the test process polls.
WATCH_ANSWERS = """() => {
  window.__lengths = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.bot');
    if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def _ask(page, question: str, expected: str, timeout: float = 180) -> int:
    """Send ``question`` and wait for ``expected`` to be shown; returns how many different partial answer
    lengths the page displayed on the way."""
    before = len(_bot_messages(page))
    page.evaluate("() => { window.__lengths = []; }")
    page.fill("#query textarea", question)
    page.click("#send")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bots = _bot_messages(page)
        if len(bots) > before and _visible(bots[-1]) == _visible(expected):
            return len({n for n in page.evaluate("() => window.__lengths") if n})
        time.sleep(0.1)
    raise AssertionError(f"the answer {expected!r} was not shown within {timeout} s: {_bot_messages(page)!r}")


def _wait_until_empty(page, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _bot_messages(page) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _bot_messages(page) == []


def test_upload_ask_and_read_the_streamed_answer(browser, web, tmp_path) -> None:
    url, worker = web
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    red.write_bytes(png_bytes((220, 30, 30), size=(64, 48)))
    blue.write_bytes(png_bytes((30, 30, 220), size=(48, 64)))
    question, follow_up = "What is in the image?", "And the colour?"
    first = _expected(worker, question, red.read_bytes())
    second = _expected(worker, follow_up, red.read_bytes(), history=[(question, first)])
    third = _expected(worker, question, blue.read_bytes())
    assert _visible(first) and _visible(second) and _visible(third), "the random model said nothing visible"

    page = browser.new_page()
    page.goto(url, wait_until="load")
    page.wait_for_selector("#query textarea", timeout=120_000)
    page.evaluate(WATCH_ANSWERS)
    page.set_input_files("#image input[type=file]", str(red))
    page.wait_for_selector("#image img", timeout=60_000)
    with probe(worker.model, seconds_per_forward=0.05):  # slow enough to see the answer grow
        partials = _ask(page, question, first)
    page.screenshot(path=str(tmp_path / "web-ui.png"), full_page=True)
    # Streamed: at least one partial answer was on the page before the final one.
    assert partials >= 2, f"the answer was shown in {partials} piece(s): it was not streamed"

    _ask(page, follow_up, second)  # the second turn of the same conversation (history kept)
    assert len(_bot_messages(page)) == 2

    page.set_input_files("#image input[type=file]", str(blue))  # a new image: a new conversation
    _wait_until_empty(page)
    _ask(page, question, third)
    assert len(_bot_messages(page)) == 1

    page.click("#clear")
    _wait_until_empty(page)
    assert (tmp_path / "web-ui.png").stat().st_size > 10_000
    page.close()


def test_health_answers_beside_the_ui(web) -> None:
    import httpx

    url, _ = web
    assert httpx.get(url + "health", timeout=10).json()["status"] == "ok"
