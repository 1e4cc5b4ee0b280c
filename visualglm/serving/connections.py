"""Connection-level limits for the HTTP server: a request-head timeout and a cap on open connections.

uvicorn bounds the time between requests on a kept-alive connection, but not the time a client may take
to send a request head: headers trickled one byte every few seconds, or a connection that sends nothing,
stay open for ever (slowloris). :class:`GuardedH11Protocol` (uvicorn's h11 protocol, extended) adds:

* **head timeout**: from the moment a connection opens, or its previous response ended, the client has
  ``header_timeout_s`` seconds to send a complete request head; otherwise it gets a 408 and is closed.
  (The body's own deadline is enforced by :mod:`visualglm.serving.guard`.)
* **connection cap**: at most ``max_connections`` open connections. A new connection at the cap closes
  an idle one to make room (one that never completed a request first, the longest idle first; a kept-alive
  client that has been served only when no such one is left), so a flood of idle connections can never
  lock out a real client; if every connection is busy with a request, the newcomer gets a 503 with
  ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from visualglm.serving.protocol import ServeLimits, error_body


def _raw_response(status: int, reason: str, error: dict[str, Any], extra: str = "") -> bytes:
    body = json.dumps(error).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and the connection cap (see the module docstring).
    Subclassed per server by :func:`protocol_for`, which sets ``limits``."""

    limits: ServeLimits = ServeLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self.idle_since = self.loop.time()
        self.served = 0  # responses completed on this connection

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # A connection that never completed a request goes first (slowloris, silent), the longest idle
            # first; a kept-alive client that has been served is closed only when no such one is left.
            victim = min((c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                          and c.idle()), key=lambda c: (c.served > 0, c.idle_since), default=None)
            if victim is None:
                self.transport.write(_raw_response(
                    503, "Service Unavailable",
                    error_body("too many open connections, retry later", type="server_overloaded",
                               code="too_many_connections"), f"retry-after: {self.limits.retry_after_s}\r\n"))
                self.transport.close()
                return
            victim.close_idle()
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._head_received()

    def on_response_complete(self) -> None:
        self.served += 1
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()
            self._head_received()  # a pipelined request may already be in

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    # -- state ---------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """No request in progress: waiting for (the rest of) a request head."""
        return not self.transport.is_closing() and self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete)

    def close_idle(self) -> None:
        self._cancel_head_timer()
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.idle_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_received(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.idle():
            self.transport.write(_raw_response(408, "Request Timeout", error_body(
                f"no complete request head within {self.limits.header_timeout_s:g} s", code="request_timeout")))
            self.transport.close()


def protocol_for(limits: ServeLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass bound to ``limits`` (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def server_config(app: Any, limits: ServeLimits, **options: Any) -> uvicorn.Config:
    """uvicorn's config for ``app`` with the connection limits of ``limits``; ``options`` (host, port,
    log_level, ...) are passed on."""
    options.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(app, http=protocol_for(limits), timeout_keep_alive=limits.keep_alive_s, **options)
