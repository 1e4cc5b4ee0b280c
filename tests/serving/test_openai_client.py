"""The official ``openai`` Python client, unmodified, against the server: plain, streaming, errors, auth."""

from __future__ import annotations

import pytest

from .conftest import data_url, png_bytes, running

openai = pytest.importorskip("openai")


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_and_a_completion(server) -> None:
    url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list()] == ["tiny"]
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "hello"}], max_tokens=6, temperature=0, seed=7)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streaming_with_an_image(server) -> None:
    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes((10, 200, 10)))}}]}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_errors_become_client_exceptions(server) -> None:
    url, _ = server
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10**5)
    assert error.value.status_code == 400 and error.value.code == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3)


def test_api_key_is_required_when_set(visual_model) -> None:
    with running(visual_model, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()
        assert [m.id for m in _client(url, "s3cret").models.list()] == ["tiny"]
        stream = _client(url, "s3cret").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        assert list(stream)[-1].choices[0].finish_reason in ("stop", "length")
