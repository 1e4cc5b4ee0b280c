"""No single request can hurt another, and no client can stall or probe the server.

One test per class of attack: numeric sampling values and one row's failure inside a batch, request bodies
that are costly to parse, clients that never finish a request, images that cost more than their pixels, file
paths as image sources, the web UI's limits, and the smaller header/stop/address checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time

import httpx
import pytest

from visualglm.serving.worker import GenerationRequest

from .conftest import TEST_LIMITS, data_url, png_bytes, probe, running

BATCH = dataclasses.replace(TEST_LIMITS, max_batch=8, max_queue=16)
PROMPTS = ["hello", "what colour is it?", "describe the image", "你好", "one more question", "shape?",
           "is it round", "hi there"]


def _chat(prompt: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, **fields}


def _answers_alone(url: str) -> dict[str, str]:
    with httpx.Client(base_url=url, timeout=60) as client:
        return {p: client.post("/v1/chat/completions", json=_chat(p, temperature=0)).json()["choices"][0][
            "message"]["content"] for p in PROMPTS}


def _batched(url: str, worker, model, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Send an opener, hold the model at a gate until every body is queued, then let them run as one batch.
    ``bodies`` are (path, json) pairs; the responses come back in the same order."""
    results: list[httpx.Response | None] = [None] * len(bodies)

    def send(index: int) -> None:
        path, body = bodies[index]
        results[index] = httpx.post(url + path, json=body, timeout=120)

    with probe(model, gated=True) as gate:
        opener = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", json=_chat("x"),
                                                            timeout=120))
        opener.start()
        deadline = time.monotonic() + 30
        while not worker.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        while worker.queued < len(bodies):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.gate.set()
        for thread in threads:
            thread.join(120)
        opener.join(120)
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- 1. numeric values, rows


@pytest.mark.parametrize("poison", [{"temperature": 1e-300}, {"temperature": 5e-324, "top_p": 5e-324},
                                    {"repetition_penalty": 1e-300, "temperature": 1e-39}])
def test_extreme_sampling_values_neither_fail_nor_hurt_the_batch(visual_model, poison) -> None:
    with running(visual_model, limits=BATCH) as (url, worker):
        alone = _answers_alone(url)
        bodies = [("/v1/chat/completions", _chat(p, temperature=0)) for p in PROMPTS[:7]]
        bodies.insert(3, ("/v1/chat/completions", _chat(PROMPTS[7], **poison)))
        responses = _batched(url, worker, visual_model[0], bodies)
        assert worker.largest_batch == 8
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert texts[:3] + texts[4:] == [alone[p] for p in PROMPTS[:7]]
    if "repetition_penalty" not in poison:  # a temperature near 0 is the greedy limit
        assert texts[3] == alone[PROMPTS[7]]


def test_the_legacy_api_takes_extreme_values_too(visual_model) -> None:
    with running(visual_model, limits=BATCH) as (url, _):
        for fields in ({"temperature": 1e-300}, {"repetition_penalty": 1e-300}, {"top_p": 5e-324}):
            response = httpx.post(url + "/", json={"text": "hello", **fields}, timeout=60)
            assert response.status_code == 200, response.text


def test_a_row_that_fails_ends_alone_and_the_batch_goes_on(visual_model, monkeypatch) -> None:
    # Two kinds of failure confined to one row: its token cannot be chosen (the sampler raises for it), and
    # its text handling raises (a detokenizer or stop-string bug). Each ends its own request with a 500
    # error; the other rows answer as they would alone.
    import visualglm.generation.continuous as engine
    import visualglm.serving.batch as batch

    real_next_tokens = engine.next_tokens

    def failing_next_tokens(logits, tokens, params, generator, valid=None):
        if params.temperature == 0.777:
            raise RuntimeError("injected sampling failure")
        return real_next_tokens(logits, tokens, params, generator, valid=valid)

    with running(visual_model, limits=BATCH) as (url, worker):
        alone = _answers_alone(url)
        monkeypatch.setattr(engine, "next_tokens", failing_next_tokens)
        monkeypatch.setattr(batch, "DecodeStream", _failing_decode_stream(batch.DecodeStream, at_token=1))
        bodies = [("/v1/chat/completions", _chat(p, temperature=0)) for p in PROMPTS[:5]]
        bodies.insert(1, ("/v1/chat/completions", _chat("a", temperature=0.777, seed=1)))
        bodies.insert(4, ("/v1/chat/completions", _chat("b", temperature=0, stop=["BOOM"])))
        bodies.append(("/", {"text": "c", "temperature": 0.777}))
        responses = _batched(url, worker, visual_model[0], bodies)
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 500, 200, 200, 500, 200, 200, 500], [r.text for r in responses]
    for index in (1, 4, 7):
        error = responses[index].json()["error"]
        assert error["type"] == "server_error" and "Traceback" not in responses[index].text
    good = [r.json()["choices"][0]["message"]["content"] for i, r in enumerate(responses) if i not in (1, 4, 7)]
    assert good == [alone[p] for p in PROMPTS[:5]]


def _failing_decode_stream(base: type, at_token: int) -> type:
    """A DecodeStream whose ``push`` raises at token ``at_token`` when its stop strings include "BOOM"."""

    class Failing(base):
        def __init__(self, *args, stop=(), **kwargs) -> None:
            super().__init__(*args, stop=stop, **kwargs)
            self.poisoned, self.pushed = "BOOM" in stop, 0

        def push(self, token: int) -> str:
            self.pushed += 1
            if self.poisoned and self.pushed >= at_token:
                raise RuntimeError("injected text failure")
            return super().push(token)

    return Failing


def test_a_failing_row_ends_its_stream_with_an_error_event(visual_model, monkeypatch) -> None:
    import visualglm.serving.batch as batch

    monkeypatch.setattr(batch, "DecodeStream", _failing_decode_stream(batch.DecodeStream, at_token=3))
    with running(visual_model, limits=BATCH) as (url, _):
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json=_chat("hello", temperature=0, stop=["BOOM"], stream=True, max_tokens=20)) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert events[-1]["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------------------- 2. bodies


def test_bodies_that_are_costly_to_parse_never_stall_health(visual_model) -> None:
    bomb = b"[" + b"[]," * ((TEST_LIMITS.max_body_bytes - 10) // 3) + b"[]]"  # ~700,000 containers
    with running(visual_model) as (url, _):
        worst = 0.0
        done = threading.Event()
        statuses: list[int] = []

        def attack() -> None:
            statuses.append(httpx.post(url + "/v1/chat/completions", content=bomb, timeout=60).status_code)

        attackers = [threading.Thread(target=attack) for _ in range(4)]
        with httpx.Client(base_url=url, timeout=10) as health:
            health.get("/health")
            for thread in attackers:
                thread.start()
            threading.Thread(target=lambda: [t.join() for t in attackers] and done.set() or done.set()).start()
            while not done.is_set():
                start = time.monotonic()
                assert health.get("/health").status_code == 200
                worst = max(worst, time.monotonic() - start)
                time.sleep(0.005)
    assert statuses == [413] * 4
    assert worst < 0.5, worst  # the benchmark (benchmarks/attack.py) measures it; a stalled loop takes seconds


def test_a_body_of_too_many_values_is_refused_before_parsing(server) -> None:
    url, _ = server
    response = httpx.post(url + "/", content=json.dumps({"text": "x", "history": [["a", "b"]] * 60_000}),
                          timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_complex"


# -------------------------------------------------------------------------------------- 3. slow clients

SLOW = dataclasses.replace(TEST_LIMITS, header_timeout_s=1.0, body_timeout_s=1.0, min_body_rate=1000,
                           keep_alive_s=1.0, max_connections=4)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open longer."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    return received


def test_a_connection_that_sends_nothing_is_closed(visual_model) -> None:
    with running(visual_model, limits=SLOW) as (url, _), _connect(url) as sock:
        start = time.monotonic()
        answer = _closed_within(sock, 5)
        assert 0.9 < time.monotonic() - start < 4
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_trickled_headers_are_cut_off(visual_model) -> None:
    with running(visual_model, limits=SLOW) as (url, _), _connect(url) as sock:
        start = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - start > 6:
                pytest.fail("the server kept reading a request head for 6 s")
        answer = _closed_within(sock, 5)
        assert time.monotonic() - start < 4
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_trickled_body_is_cut_off(visual_model) -> None:
    with running(visual_model, limits=SLOW) as (url, _), _connect(url) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        start = time.monotonic()
        try:
            for _ in range(40):
                sock.sendall(b" " * 10)
                time.sleep(0.1)
        except OSError:
            pass
        answer = _closed_within(sock, 5)
        assert time.monotonic() - start < 4
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer


def test_a_flood_of_idle_connections_never_locks_out_a_client(visual_model) -> None:
    with running(visual_model, limits=SLOW) as (url, _):
        idle = [_connect(url) for _ in range(SLOW.max_connections)]
        try:
            time.sleep(0.2)
            for _ in range(3):  # each newcomer closes the longest-idle connection instead
                assert httpx.get(url + "/health", timeout=5).status_code == 200
            assert _closed_within(idle[0], 2) == b""  # the oldest was closed, without a response
        finally:
            for sock in idle:
                sock.close()


def test_at_the_cap_with_every_connection_busy_a_newcomer_gets_503(visual_model) -> None:
    limits = dataclasses.replace(SLOW, body_timeout_s=30.0)
    with running(visual_model, limits=limits) as (url, _):
        busy = [_connect(url) for _ in range(limits.max_connections)]
        try:
            for sock in busy:  # a request head received, its body still coming: not idle
                sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.3)
            with _connect(url) as newcomer:
                answer = _closed_within(newcomer, 5)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after" in answer.lower()
        finally:
            for sock in busy:
                sock.close()


# ---------------------------------------------------------------------------------------------- 4. images


def test_an_image_longer_than_the_side_limit_is_refused_from_its_header(server) -> None:
    from tests.test_image import _png_header_claiming

    url, _ = server
    strip = data_url(_png_header_claiming(1, 900_000))  # under the test's 1 Mpx limit
    body = _chat([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": strip}}])
    start = time.monotonic()
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert time.monotonic() - start < 2
    assert response.status_code == 400 and "max_side" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------------- 5. no file oracle


def test_image_strings_never_reach_the_filesystem(server, monkeypatch, tmp_path) -> None:
    url, _ = server
    existing = tmp_path / "img.png"
    existing.write_bytes(png_bytes())
    looked_at: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: looked_at.append(os.fspath(p)) or real_stat(p, *a, **k))
    messages = []
    for path in (str(existing), str(tmp_path / "none.png")):
        legacy = httpx.post(url + "/", json={"text": "x", "image": path}, timeout=30)
        openai = httpx.post(url + "/v1/chat/completions", timeout=30, json=_chat(
            [{"type": "image_url", "image_url": {"url": path}}]))
        assert legacy.status_code == openai.status_code == 400
        messages.append((legacy.json()["error"]["message"], openai.json()["error"]["message"]))
    assert messages[0] == messages[1]
    assert not any(str(tmp_path) in seen for seen in looked_at)


# ------------------------------------------------------------------------------------------ 6. web UI


def test_the_web_ui_enforces_the_api_limits_before_tokenizing(visual_model, monkeypatch) -> None:
    pytest.importorskip("gradio", reason="the web extra is not installed")
    from visualglm.serving.web import make_respond
    from visualglm.serving.worker import Worker

    worker = Worker(*visual_model, name="tiny", limits=TEST_LIMITS)  # never started: nothing may be queued
    monkeypatch.setattr(worker, "submit", lambda *a: pytest.fail("submitted"))
    monkeypatch.setattr(worker.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized"))
    respond = make_respond(worker)
    too_long = list(respond("x" * 100_000, None, [], [], 2048, 0.4, 0.8))[-1]
    assert "more than the 4000 allowed" in too_long[0][-1]["content"]
    history = [["q", "a"]] * 200
    too_many = list(respond("hello", None, [], history, 2048, 0.4, 0.8))[-1]
    assert "200 turns" in too_many[0][-1]["content"] and too_many[1] == history


# ------------------------------------------------------------------------------------------- 7. smaller


def test_a_lone_surrogate_in_stop_is_a_400(server) -> None:
    url, _ = server
    raw = json.dumps(_chat("hi")).encode()[:-1] + b', "stop": ["\\ud800"]}'
    response = httpx.post(url + "/v1/chat/completions", content=raw, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"


def test_two_authorization_headers_are_refused(visual_model) -> None:
    with running(visual_model, api_key="k3y") as (url, _):
        good = [("Authorization", "Bearer k3y")]
        assert httpx.get(url + "/v1/models", headers=good, timeout=10).status_code == 200
        for headers in (good * 2, [("Authorization", "Bearer nope"), ("Authorization", "Bearer k3y")],
                        [("Authorization", "Bearer k3y"), ("Authorization", "Bearer nope")]):
            response = httpx.get(url + "/v1/models", headers=headers, timeout=10)
            assert response.status_code == 401, headers


def test_the_worker_never_holds_a_full_size_image_for_a_queued_request(visual_model) -> None:
    from PIL import Image

    from visualglm.serving.worker import Worker

    worker = Worker(*visual_model, name="tiny", limits=TEST_LIMITS)
    pixels = worker.prepare_image(Image.new("RGB", (1000, 900), (1, 2, 3)))
    size = visual_model[0].config.eva_config.image_size
    assert tuple(pixels.shape) == (1, 3, *((size, size) if isinstance(size, int) else size))
    job = worker.submit(GenerationRequest("hi", image=pixels, image_key="k"), lambda event: None)
    assert job.admitted.image_start is not None


def test_the_serving_docs_list_every_limit_with_its_default() -> None:
    from dataclasses import fields
    from pathlib import Path

    from visualglm.cli.limits import LIMIT_FLAGS
    from visualglm.serving.limits import ServeLimits

    page = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text(encoding="utf-8")
    safety = page[page.index("## Safety"):]
    safety = safety[:safety.index("\n## ", 1)] if "\n## " in safety[1:] else safety
    defaults = {f.name: f.default for f in fields(ServeLimits)}
    for row in LIMIT_FLAGS:
        line = next((line for line in safety.splitlines() if line.startswith(f"| `{row.flag}` |")), None)
        assert line is not None, f"{row.flag} is missing from docs/serving.md's Safety table"
        default = defaults[row.field]
        if default is not None:
            assert f"| {default:g}" in line or f"| {default} " in line, (row.flag, default, line)
