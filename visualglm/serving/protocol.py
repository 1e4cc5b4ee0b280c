"""Request and response schemas of the HTTP API, the server's limits, and its error type.

Two request formats are served: the reference VisualGLM-6B ``api.py`` body (``text``, base64 ``image``,
``history`` of ``[query, response]`` pairs) and OpenAI's chat completions. Every error any route returns
has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so that one client-side handler (and
the official ``openai`` client) understands them all.

Schemas reject NaN/Infinity (Python's JSON parser accepts those literals) and bound every number, so that a
request either validates into something the engine can run or is refused with a 4xx.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visualglm.serving.limits import ServeLimits

MAX_SEED = 2**64
__all__ = ["APIError", "ServeLimits", "ChatCompletionRequest", "LegacyRequest"]


class APIError(Exception):
    """An error to send to the client: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # extra="ignore": clients (the openai one included) send fields we do not use; they must not fail.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------------------
# Reference VisualGLM-6B api.py (POST /)
# ------------------------------------------------------------------------------------------------------


class LegacyRequest(_Strict):
    """The reference ``api.py`` body. ``prompt`` (ChatGLM-6B's ``api.py`` key) is accepted for ``text``;
    ``min_length`` is accepted and ignored as in the reference; ``repetition_penalty`` is honoured."""

    text: str | None = Field(None, description="the question (required unless `prompt` is given)")
    prompt: str | None = Field(None, description="ChatGLM-6B api.py's name for `text`")
    image: str | None = Field(None, description="base64 of the image file's bytes (VisualGLM models)")
    history: list[tuple[str, str]] = Field(default_factory=list, description="earlier [query, response] pairs")
    max_length: int | None = Field(None, ge=2, le=1_000_000, description="prompt + answer tokens")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=100)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_length: int | None = Field(None, description="accepted, unused (as in the reference)")

    def query(self) -> str:
        query = self.text if self.text is not None else self.prompt
        if query is None:
            raise APIError(400, "`text` is required", param="text", code="missing_field")
        return query


class LegacyResponse(BaseModel):
    result: str
    response: str = Field(description="the same text as `result` (the reference README's key)")
    history: list[tuple[str, str]]
    status: int
    time: str


# ------------------------------------------------------------------------------------------------------
# OpenAI chat completions
# ------------------------------------------------------------------------------------------------------


class ImageURL(_Strict):
    url: str = Field(description="data:image/...;base64,... (http(s) only with --allow-remote-images)")
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """OpenAI ``POST /v1/chat/completions``. ``top_k`` and ``repetition_penalty`` are extensions (as in
    GLM-4's server); ``temperature`` 0 means greedy decoding."""

    model: str | None = Field(None, max_length=256, description="any name: this server runs one model")
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None

    def stop_strings(self, limits: ServeLimits) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > limits.max_stop_strings:
            raise APIError(400, f"at most {limits.max_stop_strings} stop strings", param="stop")
        for stop in stops:
            if not stop or len(stop) > limits.max_stop_chars:
                raise APIError(400, f"stop strings must have 1 to {limits.max_stop_chars} characters",
                               param="stop")
            check_text(stop, "stop")
        return tuple(stops)

    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def completion_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(id: str, created: int, model: str, text: str, finish_reason: str,
                    usage: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage: dict[str, int] | None = None, with_choice: bool = True) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object (the usage-only chunk has no choices)."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": None,
                             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}] if with_choice else []}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


# ------------------------------------------------------------------------------------------------------
# From a request to one conversation: history pairs, the query, and at most one image
# ------------------------------------------------------------------------------------------------------


def check_text(text: str, param: str) -> str:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates from ``\\ud800`` escapes): it could be
    neither tokenised nor sent back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "text is not valid Unicode (lone surrogate)", param=param) from None
    return text


def check_conversation(history: list[tuple[str, str]], query: str, limits: ServeLimits, param: str) -> None:
    """History length and total text size limits; valid Unicode everywhere."""
    if len(history) > limits.max_history_turns:
        raise APIError(400, f"the history has {len(history)} turns, more than the {limits.max_history_turns} "
                       "allowed", param=param, code="history_too_long")
    total = len(query) + sum(len(q) + len(r) for q, r in history)
    if total > limits.max_text_chars:
        raise APIError(400, f"the conversation has {total} characters, more than the {limits.max_text_chars} "
                       "allowed", param=param, code="text_too_long")
    check_text(query, param)
    for q, r in history:
        check_text(q, param)
        check_text(r, param)


def _content(message: ChatMessage, index: int) -> tuple[str, list[str]]:
    """A message's text (text parts joined by newlines) and its image URLs."""
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts = [part.text for part in message.content if isinstance(part, TextPart)]
    urls = [part.image_url.url for part in message.content if isinstance(part, ImagePart)]
    if urls and message.role != "user":
        raise APIError(400, "images are accepted in user messages only", param=f"messages.{index}.content")
    return "\n".join(texts), urls


def openai_conversation(messages: list[ChatMessage], limits: ServeLimits
                        ) -> tuple[list[tuple[str, str]], str, str | None]:
    """OpenAI messages -> (history pairs, query, image URL or None).

    Consecutive user messages are joined with newlines; each assistant message closes a turn; the last
    message must come from the user. The models have no system role in their templates, so system (and
    developer) text is put before the first user message. The models take one image per conversation: it
    may be repeated (clients resend it every turn) but not changed.
    """
    system: list[str] = []
    history: list[tuple[str, str]] = []
    pending: list[str] = []
    image: str | None = None
    for index, message in enumerate(messages):
        text, urls = _content(message, index)
        for url in urls:
            if image is not None and url != image:
                raise APIError(400, "one image per conversation: these models cannot look at two",
                               param=f"messages.{index}.content", code="too_many_images")
            image = url
        if message.role in ("system", "developer"):
            system.append(text)
        elif message.role == "user":
            pending.append(text)
        else:
            history.append(("\n".join(pending), text))
            pending = []
    if not pending:
        raise APIError(400, "the last message must come from the user", param="messages")
    query = "\n".join(pending)
    if system:
        prefix = "\n".join(system) + "\n"
        if history:
            history[0] = (prefix + history[0][0], history[0][1])
        else:
            query = prefix + query
    check_conversation(history, query, limits, "messages")
    return history, query, image
