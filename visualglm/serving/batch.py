"""One request's answer as it comes out of the engine: its text stream, stop strings, usage and events.

:class:`RowOutput` turns the :class:`~visualglm.generation.continuous.TokenEvent` s of one request into the
job's ``start`` / ``delta`` / ``done`` / ``error`` events (its own DecodeStream, stop strings held back,
finish reason, usage). :func:`rows_to_end` says which requests the engine should end now (client gone, stop
string matched, a failure of the row's own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from visualglm.generation.continuous import TokenEvent
from visualglm.generation.detok import DecodeStream
from visualglm.serving.protocol import APIError

log = logging.getLogger("visualglm.serving")


class RowOutput:
    """One row's answer as events for its job: ``take`` each step, ``finish`` once.

    ``emit(kind, **fields)`` sends an event; ``cancelled()`` says whether the client left. Whatever goes
    wrong with this row alone (its token could not be chosen, its text handling or stop strings raised)
    ends this row with a 500 ``error`` event and never reaches the other rows of the batch.
    """

    def __init__(self, prompt_tokens: int, tokenizer: Any, postprocess: str, stop: Sequence[str],
                 emit: Callable[..., None], cancelled: Callable[[], bool]) -> None:
        self.prompt_tokens = prompt_tokens
        # postprocess: the family's answer post-processing style (FamilySpec.postprocess)
        self.decoded = DecodeStream(tokenizer, stop=tuple(stop), postprocess=postprocess)
        self.emit = emit
        self.cancelled = cancelled
        self.count = 0  # answer tokens (a stop id is not one)
        self.done = False
        self.reported = False  # the engine was told to end this row

    def take(self, event: TokenEvent) -> None:
        """Handle one engine event of this request."""
        if self.done:
            return
        try:
            self._take(event)
        except Exception:
            log.exception("streaming an answer failed")
            self.fail(_internal_error())

    def _take(self, event: TokenEvent) -> None:
        if self.cancelled():
            self.finish("cancelled")
            return
        if event.reason == "error":
            log.error("generation failed for one row of a batch: %s", event.error)
            self.fail(_internal_error())
            return
        if event.token is not None:
            self.count += 1
            delta = self.decoded.push(event.token)
            if delta:
                self.emit("delta", text=delta)
            if self.decoded.stopped:
                self.finish("stop")
                return
        if event.reason is not None:  # "stop" (a stop id), "length" (budget spent); "ended": done already
            self.finish("length" if event.reason == "length" else "stop")

    def finish(self, reason: str) -> None:
        """Send the held-back text (unless cancelled) and ``done`` with ``reason``."""
        if self.done:
            return
        try:
            tail = self.decoded.flush() if reason != "cancelled" else ""
        except Exception:
            log.exception("streaming an answer failed")
            self.fail(_internal_error())
            return
        self.done = True
        if tail:
            self.emit("delta", text=tail)
        self.emit("done", prompt_tokens=self.prompt_tokens, completion_tokens=self.count, finish_reason=reason)

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.done = True
            self.emit("error", error=error)


def _internal_error() -> APIError:
    return APIError(500, "internal error while generating", type="server_error")


def rows_to_end(outputs: dict[Any, RowOutput]) -> list[Any]:
    """Requests (keys of ``outputs``) the engine should stop computing now: finished on our side (stop
    string, error) or whose client left since the last step; each is reported once."""
    ended = []
    for key, output in outputs.items():
        if not output.done and output.cancelled():
            output.finish("cancelled")
        if output.done and not output.reported:
            output.reported = True
            ended.append(key)
    return ended
