"""The ASGI middleware in front of the app: API key, body size, body deadline, large-body slots.

It runs before any route and reads the whole body itself (up to ``max_body_bytes``), then replays it to the
app, so that an oversized, endless or trickled body is refused without parsing:

* **API key** (when set): every route but ``/health`` needs exactly one ``Authorization: Bearer KEY`` header
  (two headers are refused, not "last one wins"); compared in constant time.
* **size**: a ``Content-Length`` above ``max_body_bytes`` is a 413 before a byte is read; a chunked body is
  counted while it arrives.
* **time**: the body must arrive within ``body_timeout_s`` seconds plus one second per ``min_body_rate``
  bytes received (a client trickling one byte every few seconds is cut off after ``body_timeout_s``; a
  large upload at a reasonable rate is not); otherwise 408 and the connection is closed.
* **memory**: at most ``max_large_bodies`` bodies over 1 MiB are received or held at once; a further large
  body waits for a slot (its time counts against its deadline) before its bytes are read, so that TCP
  back-pressure, not this process's memory, holds the rest.
* **JSON for apps that parse it themselves** (the web UI's Gradio routes parse on the event loop):
  with ``json_body_bytes`` set, a JSON body must be at most that large and hold at most ``max_json_values``
  values, counted as in :mod:`visualglm.serving.body`. The HTTP API parses in its own threads and leaves
  this unset.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi.responses import JSONResponse

from visualglm.serving.body import count_values
from visualglm.serving.protocol import APIError, ServeLimits

OPEN_PATHS = frozenset({"/health"})
LARGE_BODY = 1 << 20  # bytes: bodies above this need a large-body slot


class Guard:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, *, api_key: str | None, limits: ServeLimits,
                 json_body_bytes: int | None = None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.limits = limits
        self.json_body_bytes = json_body_bytes
        self._large = asyncio.Semaphore(max(1, limits.max_large_bodies))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check_headers(scope)
        if error is not None:
            await send_error(scope, receive, send, error)
            return
        declared = _header(scope, b"content-length")
        holding = False
        try:
            body, holding = await self._read_body(receive, int(declared) if declared else None)
        except APIError as exc:
            await send_error(scope, receive, send, exc)
            return
        except _ClientGone:
            return
        if self.json_body_bytes is not None and b"json" in (_header(scope, b"content-type") or b"").lower():
            error = self._check_json(body)
            if error is not None:
                if holding:
                    self._large.release()
                await send_error(scope, receive, send, error)
                return
        try:
            replayed = False

            async def replay() -> dict:
                nonlocal replayed, body
                if not replayed:
                    replayed, message = True, {"type": "http.request", "body": body, "more_body": False}
                    body = b""  # the app owns it now: this frame must not keep 32 MiB alive for the whole job
                    return message
                return await receive()  # afterwards: the real channel, which reports a disconnect

            await self.app(scope, replay, send)
        finally:
            if holding:
                self._large.release()

    def _check_headers(self, scope: dict) -> APIError | None:
        headers = scope.get("headers", [])
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            given = [value for name, value in headers if name.lower() == b"authorization"]
            if len(given) != 1 or not hmac.compare_digest(given[0], b"Bearer " + self.api_key):
                detail = ("send exactly one Authorization header" if len(given) > 1 else
                          "missing or wrong API key: send `Authorization: Bearer KEY`")
                return APIError(401, detail, type="authentication_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        lengths = [value for name, value in headers if name.lower() == b"content-length"]
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                return APIError(400, "bad Content-Length header")
            if int(lengths[0]) > self.limits.max_body_bytes:
                return too_large(self.limits.max_body_bytes)
        return None

    def _check_json(self, body: bytes) -> APIError | None:
        if len(body) > self.json_body_bytes:
            return APIError(413, f"JSON body larger than {self.json_body_bytes} bytes", code="request_too_large",
                            headers={"Connection": "close"})
        if count_values(body) > self.limits.max_json_values:
            return APIError(413, f"the body holds more than {self.limits.max_json_values} JSON values",
                            code="request_too_complex")
        return None

    async def _read_body(self, receive: Any, declared: int | None) -> tuple[bytes, bool]:
        """The whole body and whether a large-body slot is held for it (the caller releases it)."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        start = loop.time()
        holding = False
        chunks: list[bytes] = []
        size = 0
        try:
            if declared is not None and declared > LARGE_BODY:
                holding = await self._take_slot(start)
            while True:
                remaining = start + limits.body_timeout_s + size / limits.min_body_rate - loop.time()
                try:
                    message = await asyncio.wait_for(receive(), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request body did not arrive in time (at least "
                                   f"{limits.min_body_rate} bytes/s after the first {limits.body_timeout_s:g} s)",
                                   code="request_timeout", headers={"Connection": "close"}) from None
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large(limits.max_body_bytes)
                if size > LARGE_BODY and not holding:
                    holding = await self._take_slot(start)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), holding
        except BaseException:
            if holding:
                self._large.release()
            raise

    async def _take_slot(self, start: float) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._large.acquire(),
                                   max(start + self.limits.body_timeout_s - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise APIError(503, "the server is busy receiving other large requests, retry later",
                           type="server_overloaded", code="busy",
                           headers={"Retry-After": str(self.limits.retry_after_s), "Connection": "close"}) from None
        return True


class _ClientGone(Exception):
    """The client disconnected while sending its body."""


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", code="request_too_large",
                    headers={"Connection": "close"})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def send_error(scope: dict, receive: Any, send: Any, error: APIError) -> None:
    await error_response(error)(scope, receive, send)
