"""Every limit is a 4xx JSON error in OpenAI's shape; the API key guards every route but /health."""

from __future__ import annotations

import base64

import httpx
import pytest

from .conftest import TEST_LIMITS, data_url, png_bytes, running


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return error


def _user(content) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def test_body_size(client) -> None:
    big = b"x" * (TEST_LIMITS.max_body_bytes + 1)
    assert _error(client.post("/v1/chat/completions", content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(TEST_LIMITS.max_body_bytes // 65536 + 2):
            yield b"y" * 65536

    assert _error(client.post("/", content=chunks()), 413)["code"] == "request_too_large"


def test_image_bytes_and_pixels(client) -> None:
    noise = base64.b64encode(b"\x89PNG" + b"\0" * (TEST_LIMITS.max_image_bytes + 10)).decode()
    error = _error(client.post("/", json={"text": "x", "image": noise}), 400)
    assert error["code"] == "invalid_image" and "max_bytes" in error["message"]
    huge = png_bytes(size=(1200, 1000))  # 1.2 Mpx, small file, over the 1 Mpx test limit
    error = _error(client.post("/v1/chat/completions", json=_user(
        [{"type": "image_url", "image_url": {"url": data_url(huge)}}])), 400)
    assert error["code"] == "invalid_image" and "pixels" in error["message"]


def test_prompt_tokens(client) -> None:
    error = _error(client.post("/v1/chat/completions", json=_user("word " * 600)), 400)
    assert error["code"] == "context_length_exceeded"
    error = _error(client.post("/", json={"text": "word " * 600}), 400)
    assert error["code"] == "context_length_exceeded"


def test_max_tokens_and_max_length(client) -> None:
    body = {**_user("hi"), "max_tokens": TEST_LIMITS.max_new_tokens + 1}
    assert _error(client.post("/v1/chat/completions", json=body), 400)["param"] == "max_tokens"
    body = {**_user("hi"), "max_completion_tokens": 10**9}
    assert _error(client.post("/v1/chat/completions", json=body), 400)["param"] == "max_completion_tokens"
    _error(client.post("/", json={"text": "hi", "max_length": 10**9}), 400)
    assert client.post("/v1/chat/completions", json={**_user("hi"), "max_tokens": TEST_LIMITS.max_new_tokens}
                       ).status_code == 200


def test_history_turns_and_text_size(client) -> None:
    turns = [["q", "r"]] * (TEST_LIMITS.max_history_turns + 1)
    assert _error(client.post("/", json={"text": "x", "history": turns}), 400)["code"] == "history_too_long"
    messages = []
    for _ in range(TEST_LIMITS.max_history_turns + 1):
        messages += [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    body = {"model": "tiny", "messages": [*messages, {"role": "user", "content": "x"}]}
    assert _error(client.post("/v1/chat/completions", json=body), 400)["code"] == "history_too_long"
    long = "字" * (TEST_LIMITS.max_text_chars + 1)
    assert _error(client.post("/v1/chat/completions", json=_user(long)), 400)["code"] == "text_too_long"
    assert _error(client.post("/", json={"text": long}), 400)["code"] == "text_too_long"


def test_stop_strings(client) -> None:
    assert _error(client.post("/v1/chat/completions", json={**_user("x"), "stop": ["s"] * 5}), 400)["param"] == "stop"
    assert _error(client.post("/v1/chat/completions", json={**_user("x"), "stop": "s" * 65}), 400)["param"] == "stop"


def test_api_key_guards_every_route_but_health(visual_model) -> None:
    with running(visual_model, api_key="k3y") as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/"),
                             ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"},
                            {"Authorization": "bearer k3y"},
                            {"Authorization": "Bearer k3y2"}):
                response = client.request(method, path, json=_user("hi"), headers=headers)
                error = _error(response, 401)
                assert error["type"] == "authentication_error" and response.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer k3y"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.post("/v1/chat/completions", json=_user("hi"), headers=ok).status_code == 200
        assert client.post("/", json={"text": "hi", "max_length": 20}, headers=ok).json()["status"] == 200
