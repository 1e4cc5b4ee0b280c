"""One batch of admitted requests, generated together: the rows every rank runs, and each row's output.

:class:`Row` is everything needed to run one request's part of a batch (its prompt ids, where its image
goes, its stopping/sampling rules and its seed); :func:`batch_steps` runs rows in one per-row
``generate_steps`` call. Rank 0's worker and, under tensor parallelism, the follower ranks call the same
:func:`batch_steps` on the same rows, so their collectives line up. :class:`RowOutput` turns one row's
tokens into a job's ``start`` / ``delta`` / ``done`` events (its own DecodeStream, stop strings, usage).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visualglm.generation.detok import DecodeStream
from visualglm.generation.engine import GenerationParams, Step, generate_steps, left_pad
from visualglm.generation.sampling import make_generator
from visualglm.serving.protocol import APIError

log = logging.getLogger("visualglm.serving")


@dataclass
class Row:
    """One request in a batch: prompt ``ids``, the index in them where its image placeholders start (None:
    no image), its ``params`` and the ``seed`` of its sampling generator (always set: rank 0 picks one for a
    request without, so that every rank samples the same tokens)."""

    ids: list[int]
    image_start: int | None
    params: GenerationParams
    seed: int


def batch_embeds(model: nn.Module, rows: Sequence[Row], images: Sequence[torch.Tensor | None]
                 ) -> torch.Tensor | None:
    """Input embeddings ``[B, T, hidden]`` of the left-padded prompts, each row's image embeddings
    (``images[b]`` ``[1, image_length, hidden]``, or None) placed at its placeholders shifted by the row's
    left padding; None when no row has an image (the engine then embeds the ids itself)."""
    if all(image is None for image in images):
        return None
    device = next(model.parameters()).device
    input_ids, num_pad = left_pad([row.ids for row in rows], model.config.pad_token_id)
    template = next(image for image in images if image is not None)
    stacked = template.new_zeros(len(rows), *template.shape[1:])
    starts: list[int | None] = []
    for b, (row, image) in enumerate(zip(rows, images, strict=True)):
        if image is None or row.image_start is None:
            starts.append(None)
            continue
        stacked[b] = image[0]
        starts.append(row.image_start + num_pad[b])
    # Under tensor parallelism the token embedding may be split across ranks: every rank makes this call.
    return model.embed_with_images(input_ids.to(device), stacked.to(device), starts)


def batch_steps(model: nn.Module, rows: Sequence[Row], images: Sequence[torch.Tensor | None],
                end_rows: Callable[[], Sequence[int]]) -> Iterator[Step]:
    """The per-row steps of ``rows`` (see ``generate_steps``): finished and ended rows are dropped from the
    batch; the KV cache is kept for the next batch of the same shape."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        embeds = batch_embeds(model, rows, images)
    generators = [make_generator(row.seed, device) for row in rows]
    return generate_steps(model, [row.ids for row in rows], params=[row.params for row in rows],
                          generator=generators, keep_cache=True, inputs_embeds=embeds, end_rows=end_rows,
                          drop_finished=True)


class RowOutput:
    """One row's answer as events for its job: ``take`` each step, ``finish`` once.

    ``emit(kind, **fields)`` sends an event; ``cancelled()`` says whether the client left. Whatever goes
    wrong with this row alone (its token could not be chosen, its text handling or stop strings raised)
    ends this row with a 500 ``error`` event and never reaches the other rows of the batch.
    """

    def __init__(self, prompt_tokens: int, tokenizer: Any, family: str, stop: Sequence[str],
                 emit: Callable[..., None], cancelled: Callable[[], bool]) -> None:
        self.prompt_tokens = prompt_tokens
        self.decoded = DecodeStream(tokenizer, stop=tuple(stop), postprocess="glm4" if family == "glm4v"
                                    else "chatglm")
        self.emit = emit
        self.cancelled = cancelled
        self.count = 0  # answer tokens (a stop id is not one)
        self.done = False
        self.reported = False  # the engine was told to end this row

    def take(self, step: Step, row: int) -> None:
        """Handle this row's token of ``step``."""
        if self.done:
            return
        try:
            self._take(step, row)
        except Exception:
            log.exception("streaming an answer failed")
            self.fail(_internal_error())

    def _take(self, step: Step, row: int) -> None:
        if self.cancelled():
            self.finish("cancelled")
            return
        reason = step.reasons[row] if step.reasons is not None else None
        if reason == "error":
            error = step.errors[row] if step.errors is not None else None
            log.error("generation failed for one row of a batch: %s", error)
            self.fail(_internal_error())
            return
        if reason is not None:  # "stop" (stop id) or "length" (budget spent); "ended" rows are done already
            self.finish("stop" if reason in ("stop", "ended") else reason)
            return
        self.count += 1
        delta = self.decoded.push(int(step.tokens[row]))
        if delta:
            self.emit("delta", text=delta)
        if self.decoded.stopped:
            self.finish("stop")

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


def rows_to_end(outputs: Sequence[RowOutput]) -> list[int]:
    """Rows the engine should stop computing now: finished on our side (stop string, error) or whose client
    left since the last step; each is reported once."""
    ended = []
    for index, output in enumerate(outputs):
        if not output.done and output.cancelled():
            output.finish("cancelled")
        if output.done and not output.reported:
            output.reported = True
            ended.append(index)
    return ended
