"""Admission happens before queueing: a request that cannot run is refused at once, even when the worker is
busy and the queue is full, and never takes a queue slot."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest

from visualglm.serving.protocol import APIError
from visualglm.serving.worker import GenerationRequest, Worker

from .conftest import TEST_LIMITS, probe, running

ONE_SLOT = dataclasses.replace(TEST_LIMITS, max_queue=1)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _chat(content: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def test_bad_requests_are_refused_while_the_worker_is_blocked_and_the_queue_full(visual_model) -> None:
    with running(visual_model, limits=ONE_SLOT) as (url, worker), probe(visual_model[0], gated=True) as forwards, \
            httpx.Client(base_url=url, timeout=10) as client:
        results: list[int] = []

        def send() -> None:
            results.append(httpx.post(f"{url}/v1/chat/completions", json=_chat("hi"), timeout=60).status_code)

        threads = [threading.Thread(target=send)]
        threads[0].start()  # runs, and stops at the gate
        _wait_for(lambda: worker.busy)
        threads.append(threading.Thread(target=send))
        threads[1].start()  # takes the only queue slot
        _wait_for(lambda: worker.queued == 1)
        # The gate stays shut until the end of this block: a request that waited for the worker would time
        # out (10 s) here, and one that reached the queue would get a 503.
        started = time.monotonic()
        too_long = client.post("/v1/chat/completions", json=_chat("word " * 600))
        assert too_long.status_code == 400, too_long.text
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        legacy = client.post("/", json={"text": "word " * 600})
        assert legacy.status_code == 400 and legacy.json()["error"]["code"] == "context_length_exceeded"
        no_room = client.post("/", json={"text": "hello", "max_length": 3})  # max_length below the prompt
        assert no_room.status_code == 400 and "max_length 3 leaves no room" in no_room.json()["error"]["message"]
        assert time.monotonic() - started < 8
        # None of them took the slot: a valid request is still refused with a 503, not a 400.
        assert client.post("/v1/chat/completions", json=_chat("hi")).status_code == 503
        assert worker.queued == 1 and forwards.calls == 0
        forwards.gate.set()
        for thread in threads:
            thread.join(60)
    assert results == [200, 200]


def test_admission_checks_without_the_worker_thread(visual_model, text_model) -> None:
    """``submit`` refuses in the caller's thread: the worker is not even started here."""
    from PIL import Image

    text = Worker(*text_model, limits=TEST_LIMITS)
    image = Image.new("RGB", (8, 8))
    with pytest.raises(APIError) as refused:
        text.submit(GenerationRequest(query="hi", image=image), lambda event: None)
    assert refused.value.status == 400 and refused.value.code == "image_not_supported"
    with pytest.raises(APIError) as refused:
        text.submit(GenerationRequest(query="hi", sampling={"top_p": 2.0}), lambda event: None)
    assert refused.value.status == 400
    assert text.queued == 0
    visual = Worker(*visual_model, limits=TEST_LIMITS)
    plain = visual.admit(GenerationRequest(query="hi"))
    with_image = visual.admit(GenerationRequest(query="hi", image=image))
    # The placeholders are counted from the config; no image is encoded.
    length, start = visual.model.config.image_length, with_image.image_start
    assert start is not None and plain.image_start is None and visual.images_encoded == 0
    assert with_image.ids[start:start + length] == [visual.tokenizer.unk_token_id] * length
    assert with_image.prompt_tokens > plain.prompt_tokens + length
    job = visual.submit(GenerationRequest(query="hi", image=image, max_new_tokens=2), lambda event: None)
    assert job.admitted is not None and visual.queued == 1
    visual.stop()
