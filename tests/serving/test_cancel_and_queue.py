"""Under load: a client that leaves cancels its generation, and a full queue answers 503 + Retry-After."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest

from .conftest import TEST_LIMITS, probe, running

LONG = dataclasses.replace(TEST_LIMITS, max_new_tokens=200, max_queue=1)
SLOW_S = 0.05  # per forward pass: an uncancelled 200-token answer would take 10 s or more


def _chat(max_tokens: int, stream: bool = False, seed: int = 0) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": stream, "seed": seed, "temperature": 0.8, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def long_server(visual_model):
    with running(visual_model, limits=LONG) as served:
        yield served


@pytest.fixture(scope="module")
def long_seed(long_server) -> int:
    """A seed whose answer runs to the full 200 tokens (no stop id), so only a cancel can end it early."""
    url, _ = long_server
    for seed in range(20):
        body = httpx.post(f"{url}/v1/chat/completions", json=_chat(200, seed=seed), timeout=60).json()
        if body["choices"][0]["finish_reason"] == "length":
            return seed
    raise AssertionError("no seed gave a full-length answer")


def _start_stream(client: httpx.Client, seed: int):
    """Open a long streaming request and read two content chunks: it is now generating."""
    context = client.stream("POST", "/v1/chat/completions", json=_chat(200, stream=True, seed=seed))
    response = context.__enter__()
    assert response.status_code == 200
    seen = 0
    for line in response.iter_lines():
        seen += line.startswith('data: {"id"')
        if seen == 3:  # the role chunk and two content chunks
            break
    return context


def test_closing_a_stream_cancels_its_generation(long_server, long_seed, visual_model) -> None:
    url, worker = long_server
    with probe(visual_model[0], SLOW_S) as forwards, httpx.Client(base_url=url, timeout=30) as client:
        context = _start_stream(client, long_seed)
        context.__exit__(None, None, None)  # the client goes away mid-answer
        response = client.post("/v1/chat/completions", json=_chat(2))
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2
        # One job at a time: had the abandoned answer gone on, it would have made its 200 forward passes
        # before this request could be answered.
        assert forwards.calls < 60, f"{forwards.calls} forward passes: the abandoned answer kept generating"
        _wait_for(lambda: not worker.busy, timeout=2)


def test_a_client_that_times_out_cancels_its_job(long_server, long_seed, visual_model) -> None:
    url, _ = long_server
    with probe(visual_model[0], SLOW_S) as forwards:
        with httpx.Client(base_url=url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/chat/completions", json=_chat(200, seed=long_seed))
        response = httpx.post(f"{url}/", json={"text": "hi", "max_length": 30}, timeout=60)
        assert response.status_code == 200
        assert forwards.calls < 60, f"{forwards.calls} forward passes: the abandoned answer kept generating"


def test_queue_full_is_503_with_retry_after(long_server, visual_model) -> None:
    url, worker = long_server
    results: list[httpx.Response] = []

    def send() -> None:
        results.append(httpx.post(f"{url}/v1/chat/completions", json=_chat(2), timeout=30))

    with probe(visual_model[0], gated=True) as forwards, httpx.Client(base_url=url, timeout=30) as client:
        first = threading.Thread(target=send)
        first.start()  # runs, and stops at the gate
        _wait_for(lambda: client.get("/health").json()["busy"])
        second = threading.Thread(target=send)
        second.start()  # waits in the queue (size 1)
        _wait_for(lambda: client.get("/health").json()["queued"] == 1)
        refused = client.post("/v1/chat/completions", json=_chat(2))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == str(LONG.retry_after_s)
        assert refused.json()["error"]["code"] == "queue_full"
        legacy = client.post("/", json={"text": "hi"})
        assert legacy.status_code == 503 and legacy.json()["error"]["type"] == "server_overloaded"
        forwards.gate.set()
        first.join(30)
        second.join(30)
    assert [r.status_code for r in results] == [200, 200]


def test_a_client_that_leaves_while_queued_is_skipped(long_server, visual_model) -> None:
    url, worker = long_server
    with probe(visual_model[0], gated=True) as forwards, httpx.Client(base_url=url, timeout=30) as client:
        blocker = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json=_chat(2),
                                                             timeout=30))
        blocker.start()
        _wait_for(lambda: client.get("/health").json()["busy"])
        with httpx.Client(base_url=url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/chat/completions", json=_chat(200))  # queued, then abandoned
        _wait_for(lambda: worker.cancelled_waiting() == 1)  # the server noticed the client leave
        served, skipped = worker.served, worker.skipped
        forwards.gate.set()
        blocker.join(30)
        _wait_for(lambda: worker.skipped == skipped + 1 and not worker.busy)
        assert worker.served == served + 1
        assert forwards.calls <= 3  # the blocker's prefill and up to 2 tokens; the abandoned job never ran
