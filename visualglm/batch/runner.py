"""Rows in, result records out: one model on a :class:`~visualglm.generation.continuous.ContinuousEngine`.

:class:`BatchRunner` keeps the engine's slots full: a row whose image is still being decoded (in the
background :class:`~visualglm.batch.images.ImagePool`) does not hold up the rows running beside it, a
finished row frees its slot at once and the next row takes it. Prompts, stop ids, the answer text and
the sampling defaults are those of a chat session (:mod:`visualglm.generation.chat`): the family's
reference sampling, overridden by the job's settings, then by the row's own fields.

Determinism: with a job seed, each row samples with a generator seeded from (job seed, row id), or from
the row's own ``seed``; the engine gives every row its own slot, positions and generator, so the answer
does not depend on which rows ran beside it, nor on how many replicas shared the job.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visualglm.batch.images import ImagePool
from visualglm.batch.inputs import BatchRow
from visualglm.config import image_size
from visualglm.families import family_spec
from visualglm.generation.chat import (
    FAMILY_DEFAULT,
    MaxLength,
    answer_stop_ids,
    build_prompt_ids,
    is_family_default,
    model_undecodable_ranges,
    resolve_max_length,
)
from visualglm.generation.continuous import ContinuousEngine, EngineRequest, rows_for_budget
from visualglm.generation.detok import DecodeStream
from visualglm.generation.engine import GenerationParams, compiled_decode_for
from visualglm.generation.sampling import SamplingParams
from visualglm.image import ImageError
from visualglm.models.interface import is_multimodal

_IMAGE_CACHE_SIZE = 16  # encoded images kept (VQA sets ask many questions about one image)


@dataclass
class BatchSettings:
    """How a job generates (plain data: it travels to Ray replicas). ``sampling`` holds SamplingParams
    overrides of the family's defaults (``do_sample`` False for greedy); ``seed`` makes every row's
    sampling reproducible; ``max_length`` :data:`~visualglm.generation.chat.FAMILY_DEFAULT` is the chat default
    (the family's: 2048, GLM-4V-9B 8192) and None no limit besides the context; ``batch_size`` is
    the number of rows generating at once (fewer when ``kv_cache_gib`` of KV cache hold fewer rows)."""

    batch_size: int = 8
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    max_length: MaxLength = FAMILY_DEFAULT
    max_new_tokens: int | None = None
    image_workers: int = 2
    allow_remote_images: bool = False
    prefill_chunk: int = 64
    kv_cache_gib: float | None = None

    def validate(self) -> BatchSettings:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.image_workers < 1:
            raise ValueError(f"--image-workers must be at least 1, got {self.image_workers}")
        if self.max_length is not None and not is_family_default(self.max_length) and self.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError("--kv-cache-gib must be positive")
        SamplingParams(**self.sampling).validate()
        return self


def row_seed(job_seed: int, key: str) -> int:
    """The seed of the row whose id key is ``key`` in a job seeded with ``job_seed`` (63 bits)."""
    digest = hashlib.sha256(f"{job_seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class _Prepared:
    row: BatchRow
    ids: list[int]
    image_start: int | None
    params: GenerationParams
    seed: int
    image: Future | None = None


class _Active:
    def __init__(self, prepared: _Prepared, decoded: DecodeStream) -> None:
        self.row = prepared.row
        self.prompt_tokens = len(prepared.ids)
        self.decoded = decoded
        self.count = 0


class BatchRunner:
    """Generates the answers of :class:`~visualglm.batch.inputs.BatchRow` s with ``model``; ``base_dir``
    is where relative image paths start. :meth:`run` yields one record per row, as rows finish."""

    def __init__(self, model: nn.Module, tokenizer: Any, settings: BatchSettings, *,
                 base_dir: str | Path = ".") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings.validate()
        config = model.config
        self.spec = family_spec(model)
        self.multimodal = is_multimodal(model)
        self.device = next(model.parameters()).device
        base = SamplingParams.for_family(self.spec, **settings.sampling)
        self._banned = tuple(base.banned_ranges) + tuple(model_undecodable_ranges(model, tokenizer))
        self.base_sampling = base.replace(banned_ranges=self._banned).validate()
        self.stop_ids = answer_stop_ids(config)
        self.max_length = resolve_max_length(settings.max_length, self.spec)
        self.context = config.max_sequence_length
        budget = None if settings.kv_cache_gib is None else int(settings.kv_cache_gib * 2**30)
        self.rows = rows_for_budget(model, self.context, settings.batch_size, budget)
        self.engine = ContinuousEngine(model, max_rows=self.rows, context=self.context,
                                       prefill_chunk=settings.prefill_chunk, compiled=compiled_decode_for(model))
        self.images = ImagePool(base_dir=base_dir, allow_remote=settings.allow_remote_images,
                                size=image_size(config), workers=settings.image_workers) if self.multimodal else None
        self._encoded: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._next_key = 0
        self.images_encoded = 0

    def close(self) -> None:
        self.engine.close()
        if self.images is not None:
            self.images.close()

    # -- preparing rows (prompt ids, limits, sampling) --------------------------------------------------------

    def prepare(self, row: BatchRow) -> _Prepared | dict:
        """``row`` ready to run, or its error record."""
        if row.error is not None:
            return error_record(row, row.error)
        if row.image is not None and not self.multimodal:
            return error_record(row, "this model reads no images (it is a text-only ChatGLM-6B checkpoint)")
        try:
            sampling = self.base_sampling.replace(**row.sampling).validate()
        except (TypeError, ValueError) as exc:
            return error_record(row, f"bad sampling settings: {exc}")
        try:
            ids, image_start = build_prompt_ids(self.model, self.tokenizer, row.query, row.history,
                                                image=row.image is not None)
        except ValueError as exc:
            return error_record(row, f"bad prompt: {exc}")
        max_length = self.max_length if row.max_length is None else row.max_length
        max_new = self.settings.max_new_tokens if row.max_new_tokens is None else row.max_new_tokens
        params = GenerationParams(max_new_tokens=max_new, max_length=max_length, stop_ids=self.stop_ids,
                                  sampling=sampling)
        try:
            params.budget(len(ids), self.context)
        except ValueError as exc:
            return error_record(row, str(exc))
        if "seed" in row.sampling:
            seed = row.sampling["seed"]
        elif self.settings.seed is not None:
            seed = row_seed(self.settings.seed, row.key)
        else:
            seed = random.SystemRandom().randrange(2**63)
        prepared = _Prepared(row, ids, image_start, params, seed)
        if row.image is not None:
            prepared.image = self.images.submit(row.image)
        return prepared

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self, rows: Iterable[BatchRow]) -> Iterator[dict]:
        """One record per row of ``rows``, in the order they finish."""
        rows = iter(rows)
        lookahead = 2 * self.rows + 2 * self.settings.image_workers  # rows whose images decode ahead
        pending: deque[_Prepared] = deque()
        active: dict[int, _Active] = {}
        exhausted = False
        engine = self.engine
        try:
            while True:
                while not exhausted and len(pending) < lookahead:
                    row = next(rows, None)
                    if row is None:
                        exhausted = True
                        break
                    prepared = self.prepare(row)
                    if isinstance(prepared, dict):
                        yield prepared
                    else:
                        pending.append(prepared)
                # A free slot takes the next row; one whose image is not decoded yet waits only when
                # nothing else is running.
                while pending and len(active) < self.rows:
                    if pending[0].image is not None and not pending[0].image.done() and active:
                        break
                    failed = self._admit(pending.popleft(), active)
                    if failed is not None:
                        yield failed
                if not active:
                    if exhausted and not pending:
                        return
                    continue
                try:
                    events = engine.step()
                except Exception as exc:
                    raise RuntimeError(f"generation failed ({type(exc).__name__}: {exc}); the rows written so "
                                       "far are kept, rerun the same command to resume") from exc
                for event in events:
                    record = self._take(event, active)
                    if record is not None:
                        yield record
        finally:
            for key in active:  # the caller stopped early: the rows end at the engine's next step
                engine.end(key)

    def _admit(self, prepared: _Prepared, active: dict[int, _Active]) -> dict | None:
        row = prepared.row
        embeds, image_key = None, None
        if prepared.image is not None:
            try:
                pixels, image_key = prepared.image.result()
            except ImageError as exc:
                return error_record(row, f"bad image: {exc}")
            except Exception as exc:  # a decoder's own failure: this row's error, never the job's
                return error_record(row, f"bad image: {type(exc).__name__}: {exc}")
            embeds = self._encode(pixels, image_key)
        self._next_key += 1
        key = self._next_key
        request = EngineRequest(key, prepared.ids, prepared.params, prepared.seed, prepared.image_start, embeds,
                                image_key)
        try:
            self.engine.submit(request)
        except ValueError as exc:
            return error_record(row, str(exc))
        active[key] = _Active(prepared, DecodeStream(self.tokenizer, stop=row.stop,
                                                     postprocess=self.spec.postprocess))
        return None

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor, key: str) -> torch.Tensor:
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key]
        embeds = self.model.encode_images(pixels.to(self.device))
        self.images_encoded += 1
        self._encoded[key] = embeds
        while len(self._encoded) > _IMAGE_CACHE_SIZE:
            self._encoded.popitem(last=False)
        return embeds

    def _take(self, event, active: dict[int, _Active]) -> dict | None:
        """Handle one engine event; the row's record when it has finished."""
        current = active.get(event.id)
        if current is None:  # a row ended on our side (stop string) whose "ended" event comes now
            return None
        if event.reason == "error":
            del active[event.id]
            return error_record(current.row, f"generation failed: {type(event.error).__name__}: {event.error}")
        if event.token is not None:
            current.count += 1
            current.decoded.push(event.token)
            if current.decoded.stopped:  # a stop string: the engine drops the row at its next step
                self.engine.end(event.id)
                del active[event.id]
                return self._finished(current, "stop")
        if event.reason is not None:
            del active[event.id]
            return self._finished(current, "length" if event.reason == "length" else "stop")
        return None

    def _finished(self, current: _Active, reason: str) -> dict:
        current.decoded.flush()
        return {"id": current.row.id, "answer": current.decoded.text, "finish_reason": reason,
                "prompt_tokens": current.prompt_tokens, "completion_tokens": current.count}


def error_record(row: BatchRow, message: str) -> dict:
    return {"id": row.id, "error": message}
