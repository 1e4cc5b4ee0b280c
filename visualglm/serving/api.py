"""The HTTP API (FastAPI): the reference ``api.py`` endpoint and OpenAI-compatible chat completions.

Routes: ``GET /health`` (never needs the key), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions`` (JSON or server-sent events), ``POST /`` (reference VisualGLM-6B body).

Safety: the API key, the body's size and arrival time and the number of large bodies at once are checked
before a route runs (:mod:`visualglm.serving.guard`); connections that never complete a request are closed
(:mod:`visualglm.serving.connections`). The event loop never does CPU-heavy work: JSON parsing (with a
bound on the number of values, :mod:`visualglm.serving.body`), validation, base64 and image decoding,
hashing and preprocessing run in at most ``request_threads`` threads at once. Schemas bound every field
(:mod:`visualglm.serving.protocol`); images are decoded under byte, side, aspect and pixel limits; a string
that is no image source is refused without touching the filesystem; remote URLs are fetched only when
allowed; a full queue is a 503 with ``Retry-After``; a client that disconnects cancels its job (polled while
waiting, and by the closed stream); every error is OpenAI's JSON error object, never a stack trace.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from visualglm.generation.chat import default_max_length
from visualglm.image import ImageError, image_bytes
from visualglm.serving.body import parse_json_body
from visualglm.serving.guard import Guard, error_response
from visualglm.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    LegacyRequest,
    LegacyResponse,
    check_conversation,
    chunk_body,
    completion_body,
    completion_usage,
    openai_conversation,
)
from visualglm.serving.worker import Event, GenerationRequest, Job, Worker

log = logging.getLogger("visualglm.serving")

_DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client closed the connection; its job has been cancelled."""


class _JobStream:
    """A submitted job's events, read from the event loop; waiting notices a client that disconnects.
    Create it with :meth:`open`."""

    def __init__(self, request: Request, job: Job, events: asyncio.Queue[Event]) -> None:
        loop = asyncio.get_running_loop()
        self.events = events
        self.request = request
        self.job = job
        self._loop = loop
        self._next_poll = loop.time() + _DISCONNECT_POLL_S

    @classmethod
    async def open(cls, worker: Worker, request: Request, generation: GenerationRequest,
                   in_thread: Callable[..., Awaitable[Any]]) -> _JobStream:
        """Admit and queue ``generation``. Admission tokenizes the whole conversation (a long one takes a
        while), so it runs in a request thread (``in_thread``), not on the event loop; its 400s and the
        queue's 503 are raised here."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = await in_thread(worker.submit, generation,
                              lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        return cls(request, job, events)

    async def next(self) -> Event:
        # Poll by the clock, not only when idle: a steady flow of tokens must not hide a departed client.
        while True:
            now = self._loop.time()
            if now >= self._next_poll:
                self._next_poll = now + _DISCONNECT_POLL_S
                if await self.request.is_disconnected():
                    self.job.cancel.set()
                    raise ClientGone
            try:
                return await asyncio.wait_for(self.events.get(), max(0.001, self._next_poll - now))
            except asyncio.TimeoutError:
                continue

    async def collect(self) -> tuple[str, Event]:
        """The whole answer and the ``done`` event; an ``error`` event is raised."""
        parts: list[str] = []
        try:
            while True:
                event = await self.next()
                if event.kind == "delta":
                    parts.append(event.text)
                elif event.kind == "error":
                    raise event.error
                elif event.kind == "done":
                    return "".join(parts), event
        finally:
            self.job.cancel.set()  # no-op when done; stops the job if this coroutine was cancelled


def _sampling(temperature: float | None, top_p: float | None, top_k: int | None,
              repetition_penalty: float | None, seed: int | None = None) -> dict[str, Any]:
    """Request fields -> SamplingParams overrides (unset fields keep the model's reference defaults)."""
    overrides: dict[str, Any] = {}
    if temperature is not None:
        overrides.update(do_sample=False) if temperature == 0 else overrides.update(temperature=temperature)
    for name, value in (("top_p", top_p), ("top_k", top_k), ("repetition_penalty", repetition_penalty)):
        if value is not None:
            overrides[name] = value
    if seed is not None:
        overrides["seed"] = seed % 2**64  # OpenAI seeds may be negative int64s
    return overrides


def _validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first field pydantic refused."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}"
    return APIError(400, message, param=".".join(where) or None, code="invalid_value")


def _parse(raw: bytes, model: type[BaseModel], max_values: int) -> BaseModel:
    """``raw`` JSON validated as ``model`` (run in a request thread, never on the event loop)."""
    try:
        return model.model_validate(parse_json_body(raw, max_values))
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI description of a JSON body that the route reads itself (see ``read_json``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def _body(request: Request) -> bytes:
    """The request body, read from the ASGI channel without Starlette's cache (which would keep the bytes
    for the whole request)."""
    chunks = []
    async for chunk in request.stream():
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(worker: Worker, *, api_key: str | None = None, allow_remote_images: bool = False) -> FastAPI:
    """The FastAPI app serving ``worker``'s model (start the worker first; the app does not own it)."""
    limits = worker.limits
    app = FastAPI(title="VisualGLM API", version="1", description="Reference api.py and OpenAI-compatible "
                  "chat completions for ChatGLM-6B, VisualGLM-6B and GLM-4V-9B.")
    app.add_middleware(Guard, api_key=api_key, limits=limits)
    created = int(time.time())
    # Parsing, validation and image decoding: bounded in number, and off the event loop.
    request_threads = anyio.CapacityLimiter(max(1, limits.request_threads))

    async def in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(function, *args, **kwargs),
                                              limiter=request_threads)

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        return await in_thread(_parse, await _body(request), model, limits.max_json_values)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error_response(APIError(exc.status_code, detail, type=kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "internal server error", type="server_error"))

    def read_image(source: str, param: str, remote: bool) -> tuple[Any, str]:
        """A client's image -> (pixel values ready for the model, hash of the file bytes), under the limits
        (runs in a request thread). The hash lets the worker reuse the encoding when the same image comes
        back next turn."""
        try:
            data = image_bytes(source, allow_remote=remote, allow_files=False, max_bytes=limits.max_image_bytes)
            return worker.read_image(data)
        except ImageError as exc:
            raise APIError(400, f"bad image: {exc}", param=param, code="invalid_image") from None

    async def load_request_image(source: str, param: str, *, remote_ok: bool) -> tuple[Any, str]:
        if not worker.multimodal:
            raise worker.image_not_supported(param)
        remote = source[:8].lower().startswith(("http://", "https://"))
        if remote and not remote_ok:
            raise APIError(400, "remote image URLs are disabled (start the server with --allow-remote-images); "
                           "send a data: URL", param=param, code="remote_images_disabled")
        return await in_thread(read_image, source, param, remote)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": worker.name, "busy": worker.busy, "queued": worker.queued,
                "prefill_chunk": worker.prefill_chunk}

    def model_card() -> dict[str, Any]:
        return {"id": worker.name, "object": "model", "created": created, "owned_by": "visualglm"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != worker.name:
            raise APIError(404, f"model {model_id[:100]!r} not found (this server runs {worker.name!r})",
                           type="not_found_error", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response | dict[str, Any]:
        body: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        history, query, image_url = openai_conversation(body.messages, limits)
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported (use "
                           "repetition_penalty)", param="presence_penalty")
        answer_limit = body.answer_limit()
        if answer_limit is not None and answer_limit > limits.max_new_tokens:
            raise APIError(400, f"max_tokens {answer_limit} is more than the {limits.max_new_tokens} allowed",
                           param="max_tokens", code="max_tokens_exceeded")
        image, key = (None, None)
        if image_url is not None:
            image, key = await load_request_image(image_url, "messages", remote_ok=allow_remote_images)
        generation = GenerationRequest(
            query=query, history=history, image=image, image_key=key,
            sampling=_sampling(body.temperature, body.top_p, body.top_k, body.repetition_penalty, body.seed),
            max_new_tokens=answer_limit or limits.max_new_tokens, stop=body.stop_strings(limits))
        stream = await _JobStream.open(worker, request, generation, in_thread)
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                text, done = await stream.collect()
            except ClientGone:
                return Response(status_code=499)
            usage = completion_usage(done.prompt_tokens, done.completion_tokens)
            return completion_body(completion_id, now, worker.name, text, done.finish_reason, usage)
        try:  # wait for the prompt to be accepted, so that its errors are still proper HTTP statuses
            first = await stream.next()
        except ClientGone:
            return Response(status_code=499)
        if first.kind == "error":
            raise first.error
        if first.kind != "start":  # dropped unstarted: the worker is shutting down
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(stream, first, completion_id, now, worker.name, include_usage),
                                 media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/", response_model=LegacyResponse, openapi_extra=_json_body(LegacyRequest))
    async def legacy(request: Request) -> Response | dict[str, Any]:
        body: LegacyRequest = await read_json(request, LegacyRequest)
        query = body.query()
        history = [(q, r) for q, r in body.history]
        check_conversation(history, query, limits, "history")
        image, key = (None, None)
        if body.image:  # the reference requires it; an empty string or null means a text-only turn here
            image, key = await load_request_image(body.image, "image", remote_ok=False)
        max_length = body.max_length or default_max_length(worker.spec)  # the reference default
        generation = GenerationRequest(
            query=query, history=history, image=image, image_key=key,
            sampling=_sampling(body.temperature, body.top_p, body.top_k, body.repetition_penalty),
            max_length=max_length, max_new_tokens=limits.max_new_tokens)
        try:
            stream = await _JobStream.open(worker, request, generation, in_thread)
            text, _ = await stream.collect()
        except ClientGone:
            return Response(status_code=499)
        return {"result": text, "response": text, "history": [*history, (query, text)], "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    schema = app.openapi

    def openapi() -> dict[str, Any]:  # the bodies the routes read themselves, in the components
        if app.openapi_schema is None:
            document = schema()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, LegacyRequest):
                described = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(described.pop("$defs", {}))
                components[model.__name__] = described
        return app.openapi_schema

    app.openapi = openapi
    return app


def _sse_line(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse(stream: _JobStream, first: Event, completion_id: str, created: int, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content chunks, a chunk with finish_reason, optionally a
    usage chunk, then ``data: [DONE]``. An error after the stream started is sent as an error event (the
    ``openai`` client raises it). Leaving this generator early (client gone) cancels the job."""
    prompt_tokens = first.prompt_tokens
    try:
        yield _sse_line(chunk_body(completion_id, created, model, {"role": "assistant", "content": ""}))
        while True:
            event = await stream.next()
            if event.kind == "delta":
                yield _sse_line(chunk_body(completion_id, created, model, {"content": event.text}))
            elif event.kind == "error":
                yield _sse_line(event.error.body())
                break
            elif event.kind == "done":
                yield _sse_line(chunk_body(completion_id, created, model, {}, event.finish_reason))
                if include_usage:
                    usage = completion_usage(prompt_tokens, event.completion_tokens)
                    yield _sse_line(chunk_body(completion_id, created, model, {}, usage=usage, with_choice=False))
                break
        yield _sse_line("[DONE]")
    except ClientGone:
        return
    finally:
        stream.job.cancel.set()

