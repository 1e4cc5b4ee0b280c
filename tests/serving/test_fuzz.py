"""Property-based fuzzing of both request schemas: whatever a client sends, the answer is never a 5xx,
always JSON errors in OpenAI's shape for 4xx, and a well-formed event stream for 200 streams."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import data_url, png_bytes

# Deterministic examples (the same in CI and locally), no example database written into the work tree.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(
    max_size=20)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
TEXT = st.text(max_size=40) | st.sampled_from(["", "你好", "What is it?", "\ud800", "\x00\x1b[2J", "🙂" * 5])
SMALL_PNG = data_url(png_bytes(size=(8, 8)))
IMAGE_URLS = st.sampled_from([SMALL_PNG, "data:image/png;base64,AAAA", "data:,", "http://127.0.0.1/x.png",
                              "file:///etc/passwd", "/etc/passwd", "", "data:image/png;base64,%%%"]) | TEXT


def maybe(strategy):
    """A value from ``strategy``, or anything JSON can carry (to hit the type checks)."""
    return st.one_of(strategy, strategy, strategy, JSON)


PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": maybe(TEXT)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": maybe(
        st.fixed_dictionaries({"url": IMAGE_URLS}, optional={"detail": st.sampled_from(["auto", "low"])}))}),
    st.fixed_dictionaries({"type": maybe(st.sampled_from(["audio", "input_audio", "file"]))}),
)
MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant", "developer", "tool", "User"]))},
    optional={"content": maybe(TEXT | st.lists(PART, max_size=3) | st.none()), "name": TEXT})
CHAT = st.fixed_dictionaries(
    {"messages": maybe(st.lists(MESSAGE, min_size=0, max_size=4))},
    optional={
        "model": maybe(TEXT), "max_tokens": maybe(st.integers(-2, 6) | st.integers(30, 10**30)),
        "max_completion_tokens": maybe(st.integers(-2, 6)), "temperature": maybe(st.floats(-1, 3)),
        "top_p": maybe(st.floats(-0.5, 1.5)), "top_k": maybe(st.integers(-5, 2000)),
        "repetition_penalty": maybe(st.floats(-1, 3)), "seed": maybe(st.integers(-(2**65), 2**65)),
        "stop": maybe(TEXT | st.lists(TEXT, max_size=6)), "stream": maybe(st.booleans()),
        "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
        "n": maybe(st.integers(-1, 3)), "presence_penalty": maybe(st.floats(-3, 3)),
    })
LEGACY = st.fixed_dictionaries(
    {},
    optional={
        "text": maybe(TEXT), "prompt": maybe(TEXT),
        "image": maybe(st.sampled_from([SMALL_PNG.split(",", 1)[1], "", "AAAA", "not base64!"])),
        "history": maybe(st.lists(st.lists(TEXT, min_size=0, max_size=3), max_size=3)),
        "max_length": maybe(st.integers(-5, 80) | st.integers(10**6, 10**20)), "top_p": maybe(st.floats(-1, 2)),
        "top_k": maybe(st.integers(-5, 200)), "temperature": maybe(st.floats(-1, 2)),
        "repetition_penalty": maybe(st.floats(-1, 3)), "min_length": maybe(st.integers(-5, 5)),
    })


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        for line in lines[:-1]:
            json.loads(line[6:])
        return
    body = response.json()
    if response.status_code >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.text


def post(client: httpx.Client, path: str, body) -> None:
    # ensure_ascii: lone surrogates travel as \ud800 escapes, as a client's JSON would carry them.
    check(client.post(path, content=json.dumps(body, allow_nan=True),
                      headers={"content-type": "application/json"}))


@FUZZ
@given(body=CHAT)
def test_chat_completions_never_fail_on_the_server(client, body) -> None:
    post(client, "/v1/chat/completions", body)


@FUZZ
@given(body=LEGACY)
def test_legacy_endpoint_never_fails_on_the_server(client, body) -> None:
    post(client, "/", body)


@settings(FUZZ, max_examples=40)
@given(body=JSON, path=st.sampled_from(["/", "/v1/chat/completions", "/v1/models", "/health"]))
def test_any_json_anywhere(client, body, path) -> None:
    post(client, path, body)


@settings(FUZZ, max_examples=30)
@given(raw=st.binary(max_size=200))
def test_raw_bytes(client, raw) -> None:
    check(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}))
    check(client.post("/", content=raw))
