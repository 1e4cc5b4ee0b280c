"""Contract of the HTTP API: the reference api.py endpoint and the OpenAI-compatible routes."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

from visualglm.generation.chat import ChatSession
from visualglm.generation.sampling import SamplingParams

from .conftest import data_url, png_bytes, running

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _session(visual_model, english=None, image=None) -> ChatSession:
    model, tokenizer = visual_model
    session = ChatSession(model, tokenizer, sampling=SamplingParams.visualglm(do_sample=False), max_length=2048,
                          max_new_tokens=32, english=english)
    if image is not None:
        session.set_image(image)
    return session


def test_health_and_models(client) -> None:
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "busy": False, "queued": 0,
                                            "prefill_chunk": 32}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_legacy_answers_like_the_library_and_updates_the_history(client, visual_model) -> None:
    history = [["你好", "你好！"]]
    response = client.post("/", json={"text": "这是什么？", "history": history, **GREEDY})
    assert response.status_code == 200
    body = response.json()
    session = _session(visual_model)
    session.history = [tuple(turn) for turn in history]
    expected = session.chat("这是什么？")
    assert body["result"] == body["response"] == expected
    assert body["history"] == [*history, ["这是什么？", expected]]
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])


def test_legacy_picks_the_english_template_without_cjk(client, visual_model) -> None:
    english = _session(visual_model, english=None).chat("What is this?")  # auto: no CJK -> Q:/A:
    chinese_template = _session(visual_model, english=False).chat("What is this?")
    assert english != chinese_template  # the test can tell the templates apart
    assert client.post("/", json={"text": "What is this?", **GREEDY}).json()["result"] == english
    assert client.post("/", json={"prompt": "What is this?", **GREEDY}).json()["result"] == english  # ChatGLM key


def test_legacy_image_is_base64_file_bytes(client, visual_model) -> None:
    import io

    from PIL import Image

    image = png_bytes((20, 180, 40))
    body = client.post("/", json={"text": "描述这张图片。", "image": base64.b64encode(image).decode(), "history": [],
                                  **GREEDY}).json()
    expected = _session(visual_model, image=Image.open(io.BytesIO(image))).chat("描述这张图片。")
    assert body["result"] == expected
    without_image = client.post("/", json={"text": "描述这张图片。", **GREEDY}).json()["result"]
    assert without_image != expected


def test_legacy_errors_are_openai_shaped(client) -> None:
    for body, param in (({"history": []}, "text"), ({"text": "x", "image": "bm90IGFuIGltYWdl"}, "image"),
                        ({"text": "x", "history": [["only one"]]}, "history.0"),
                        ({"text": "x", "top_p": 0}, "top_p"), ({"text": "x", "max_length": 3}, None)):
        response = client.post("/", json=body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"].startswith(param), (body, error)


def test_legacy_refuses_images_on_a_text_model(text_model) -> None:
    with running(text_model, name="text") as (url, _):
        response = httpx.post(url, json={"text": "hi", "image": base64.b64encode(png_bytes()).decode()})
        assert response.status_code == 400 and response.json()["error"]["code"] == "image_not_supported"
        chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "text", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "image_not_supported"
        assert httpx.post(url, json={"text": "hi", **GREEDY}).json()["status"] == 200


def _chat(client, **body) -> dict:
    body.setdefault("model", "tiny")
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_completion_object(client, visual_model) -> None:
    body = _chat(client, max_tokens=5, **GREEDY)
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    prompt_ids, _ = _session(visual_model).prompt_ids("hello")
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5


def test_history_and_system_messages_become_the_template(client, visual_model) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what now?"}]
    text = _chat(client, messages=messages, max_tokens=32, **GREEDY)["choices"][0]["message"]["content"]
    session = _session(visual_model)
    session.history = [("Be brief.\nhello", "hi")]
    assert text == session.chat("what now?")


def test_image_url_data_and_repeated_image(client, server, visual_model) -> None:
    import io

    from PIL import Image

    _, worker = server
    image = png_bytes((30, 30, 220), size=(64, 48))
    part = {"type": "image_url", "image_url": {"url": data_url(image)}}
    first = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]}]
    encoded = worker.images_encoded
    answer = _chat(client, messages=first, max_tokens=32, **GREEDY)["choices"][0]["message"]["content"]
    assert answer == _session(visual_model, image=Image.open(io.BytesIO(image))).chat("What is it?")
    follow_up = [*first, {"role": "assistant", "content": answer},
                 {"role": "user", "content": [part, {"type": "text", "text": "And?"}]}]
    _chat(client, messages=follow_up, max_tokens=4, **GREEDY)
    assert worker.images_encoded == encoded + 1  # the same image is encoded once
    other = {"type": "image_url", "image_url": {"url": data_url(png_bytes((1, 2, 3)))}}
    two = [{"role": "user", "content": [part, other]}]
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": two})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"


def test_remote_images_need_the_flag(client) -> None:
    part = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": [part]}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "remote_images_disabled"
    for url in ("/etc/passwd", "file:///etc/passwd", "iVBORw0KGgo="):
        part = {"type": "image_url", "image_url": {"url": url}}
        response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": [part]}]})
        assert response.status_code == 400, url


def test_remote_images_allowed_still_refuse_private_addresses(visual_model) -> None:
    with running(visual_model, allow_remote_images=True) as (url, _):
        part = {"type": "image_url", "image_url": {"url": f"{url}/health"}}  # loopback: refused by image.py
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": [part]}]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"


def test_seed_makes_sampling_reproducible(client) -> None:
    one = _chat(client, seed=1234, max_tokens=16, temperature=1.0)["choices"][0]["message"]["content"]
    two = _chat(client, seed=1234, max_tokens=16, temperature=1.0)["choices"][0]["message"]["content"]
    assert one == two


def test_stop_strings_cut_the_answer(client) -> None:
    full = _chat(client, max_tokens=32, **GREEDY)["choices"][0]["message"]["content"]
    visible = full.strip()
    if len(visible) < 3:
        pytest.skip("the random model's answer is too short to cut")
    stop = visible[len(visible) // 2:len(visible) // 2 + 1]
    cut = _chat(client, max_tokens=32, stop=[stop], **GREEDY)["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == full[:full.index(stop)]


def _sse(client, **body) -> list:
    body.setdefault("model", "tiny")
    body.setdefault("messages", [{"role": "user", "content": "hello"}])
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streaming_chunks_follow_openai(client) -> None:
    chunks = _sse(client, max_tokens=8, stream_options={"include_usage": True}, **GREEDY)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, final, usage = chunks
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 8
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == _chat(client, max_tokens=8, **GREEDY)["choices"][0]["message"]["content"]
    no_usage = _sse(client, max_tokens=2, **GREEDY)
    assert "usage" not in no_usage[-1] and no_usage[-1]["choices"][0]["finish_reason"] is not None


def test_stream_errors_before_the_first_token_are_http_errors(client) -> None:
    long = "word " * 600  # > max_prompt_tokens (400) tokens, under max_text_chars (4000)
    response = client.post("/v1/chat/completions", json={"model": "tiny", "stream": True, "messages": [
        {"role": "user", "content": long}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "tool", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
    {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5},
    {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ""},
    {"messages": "hi"},
])
def test_bad_chat_requests_are_400(client, body) -> None:
    response = client.post("/v1/chat/completions", json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_routes(client) -> None:
    for content in (b"{not json", b"", b"[]", b"null", b'{"messages": NaN}', b"\xff\xfe"):
        response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        assert "error" in response.json()
    nan = client.post("/v1/chat/completions", content=b'{"model":"t","messages":[{"role":"user","content":"x"}],'
                      b'"temperature":NaN}', headers={"content-type": "application/json"})
    assert nan.status_code == 400
    assert client.get("/nowhere").json()["error"]["type"] == "not_found_error"
    wrong_method = client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
