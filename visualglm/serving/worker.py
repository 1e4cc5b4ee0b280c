"""One model, one worker thread, a bounded queue of generation jobs, continuously batched.

The HTTP API and the web UI both submit :class:`GenerationRequest` s here. A request is stateless (it
carries its whole history). ``submit`` admits it first, in the caller's thread: it builds the prompt ids
and checks every limit (prompt tokens, length budget, sampling settings, an image for a text-only model),
so a request that cannot run is refused with a 400 at once and never takes a queue slot. The model (and
its KV cache) is only ever touched by the worker thread, which runs a
:class:`~visualglm.generation.continuous.ContinuousEngine`: at every step a waiting job whose turn has come
joins the running batch when a slot is free (its image encoded first, its prompt prefilled, reusing cached
tokens where that is exact), every running row gets its next token, and a row that finishes, fails or whose
client leaves frees its slot at once. Slots: ``limits.max_batch``, fewer when the KV cache budget
(``limits.kv_cache_gib``; default: half the memory free at start-up) holds fewer rows of full context.
With ``scheduler="static"`` a new batch starts only when the previous one has ended (the behaviour before
continuous batching, kept for comparison). Without ``limits.prefill_chunk`` the worker first times a few
steps of its engine on synthetic prompts (:mod:`visualglm.generation.step_costs`, about a second) and takes
the prefill chunk that keeps a step carrying a prompt within ``STEP_RATIO`` decode steps of one row on this
machine.

Jobs report through a ``sink`` callback (called on the worker thread) with :class:`Event` s: ``start`` when
the job enters the engine, ``delta`` for each piece of text, then exactly one of ``done`` or ``error``. A job
whose ``cancel`` flag is set (the client went away) leaves before its next token, or is skipped if it has
not started.

Under tensor parallelism (``channel`` set, rank 0) each step's newcomers (with their image embeddings) and
ended rows are sent to the other ranks, which make the same engine calls (:mod:`visualglm.serving.follower`).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visualglm.checkpoint.load import release_freed_memory
from visualglm.config import image_size
from visualglm.families import FamilySpec, family_spec
from visualglm.generation.chat import answer_stop_ids, build_prompt_ids, model_undecodable_ranges
from visualglm.generation.continuous import (
    ContinuousEngine,
    EngineRequest,
    TokenEvent,
    kv_bytes_per_token,
    rows_for_budget,
)
from visualglm.generation.engine import GenerationParams, compiled_decode_for
from visualglm.generation.sampling import SamplingParams
from visualglm.generation.step_costs import PROBE_CHUNK, measure_step_costs, stepper
from visualglm.image import ImageError, load_image, preprocess
from visualglm.models.interface import is_multimodal
from visualglm.serving.batch import RowOutput, rows_to_end
from visualglm.serving.limits import SHORT_PROMPT_TOKENS, STEP_RATIO
from visualglm.serving.protocol import APIError, ServeLimits

log = logging.getLogger("visualglm.serving")

_LARGE_IMAGE_BYTES = 4 << 20  # after reading an image that cost more, freed memory is handed back
_IMAGE_CACHE_SIZE = 4  # encoded images kept: multi-turn clients resend the same image every turn


@dataclass
class GenerationRequest:
    """One answer to generate. ``sampling`` overrides the family's reference defaults (SamplingParams
    fields); ``max_length`` is the reference's prompt + answer total, ``max_new_tokens`` the answer alone;
    ``image`` is a decoded PIL image or its pixel values from :meth:`Worker.prepare_image`, and
    ``image_key`` (e.g. a hash of its bytes) lets the worker reuse the encoding of an image it saw recently."""

    query: str
    history: list[tuple[str, str]] = field(default_factory=list)
    image: Any = None
    image_key: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a job reports: kind ``start`` | ``delta`` | ``done`` | ``error``."""

    kind: str
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # done: "stop" (stop id or stop string), "length", or "cancelled"
    error: APIError | None = None


@dataclass
class Admitted:
    """What admission worked out for a request: its prompt ``ids``, where the image placeholders start in
    them (None without an image), and the stopping and sampling rules (``params``) it will run with."""

    ids: list[int]
    image_start: int | None
    params: GenerationParams
    budget: int  # answer tokens it may generate

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


class Job:
    """A submitted, admitted request; ``cancel`` may be set from any thread."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None], admitted: Admitted) -> None:
        self.request = request
        self.admitted = admitted
        self.cancel = threading.Event()
        self._sink = sink

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except Exception:  # a consumer that went away (closed event loop) must not stop the worker
            log.debug("dropped %s event", event.kind, exc_info=True)


class QueueFullError(APIError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(503, "the server is busy: too many queued requests, retry later",
                         type="server_overloaded", code="queue_full",
                         headers={"Retry-After": str(retry_after_s)})


class Worker:
    """Runs batches of jobs on a daemon thread. ``submit`` never blocks: a full queue raises
    :class:`QueueFullError` (503). ``channel`` (rank 0 under tensor parallelism) sends every batch to the
    other ranks; see :class:`visualglm.serving.follower.Leader`."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str = "visualglm",
                 limits: ServeLimits | None = None, channel: Any = None, scheduler: str = "continuous") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.limits = limits or ServeLimits()
        self.spec: FamilySpec = family_spec(model)
        self.multimodal = is_multimodal(model)
        self.context: int = model.config.max_sequence_length
        if self.limits.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.limits.max_batch}")
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be 'continuous' or 'static', got {scheduler!r}")
        self.scheduler = scheduler
        budget = None if self.limits.kv_cache_gib is None else int(self.limits.kv_cache_gib * 2**30)
        if budget is None and model.config.max_sequence_length * self.limits.max_batch > 0:
            budget = _default_kv_budget()
        self.rows = rows_for_budget(model, self.context, self.limits.max_batch, budget)
        self.kv_cache_bytes = self.rows * self.context * kv_bytes_per_token(model)
        # Prompt tokens a step carries beside decoding rows: the limit, or measured when the worker starts
        # (``step_costs``: what suits this machine), the probe's chunk until then.
        self.prefill_chunk: int = self.limits.prefill_chunk or PROBE_CHUNK
        self.step_costs = None
        self._builds = 0  # engines built (``_fresh_engine``; part of engine_shape)
        self.channel = channel
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.limits.max_queue)
        self._thread: threading.Thread | None = None
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._next_id = 0
        self._stopping = threading.Event()
        self._poll_s: float | None = None  # None: block on the queue (the thread started by start())
        self.engine: ContinuousEngine | None = None
        self.busy = False
        self.served = 0  # jobs run (answered, failed or cancelled while running)
        self.skipped = 0  # jobs dropped before they started: their client had left
        self.images_encoded = 0
        # The output layer has rows the tokenizer cannot decode (padding): never sample them (as ChatSession).
        self._undecodable = tuple(model_undecodable_ranges(model, tokenizer))
        self._stop_ids = answer_stop_ids(model.config)

    @property
    def engine_shape(self) -> tuple[int, int, int, int]:
        """(rows, context, prefill chunk, build): followers build the same engine, and a fresh one (empty
        slots) whenever it changes: the build number counts the engines this worker built, so every rank
        starts each one empty (after the step-cost measurement, a failed step, a restart), even when the
        rest of the shape is the same."""
        return self.rows, self.context, self.prefill_chunk, self._builds

    @property
    def largest_batch(self) -> int:
        """Most rows decoded in one step so far."""
        return 0 if self.engine is None else self.engine.stats.largest_batch

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Worker:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = threading.Event()
            self._thread = threading.Thread(target=self._run, name="visualglm-worker", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Run the worker's loop in the calling thread until :meth:`request_stop` (the command line runs
        it in the main thread, and the HTTP server in another: with OpenMP, a thread other than the one
        that first ran parallel work measured ~40% slower per decode step on a 2-core CPU)."""
        self._stopping = threading.Event()
        self._poll_s = 0.2  # notice request_stop (set from a signal handler) while idle
        self._run()

    def request_stop(self) -> None:
        """Ask :meth:`run` to end: the running answers end before their next token. Safe to call from a
        signal handler (it only sets a flag)."""
        self._stopping.set()

    def _drop_queue(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancel.set()
                job.emit(Event("done", finish_reason="cancelled"))

    def stop(self, timeout: float = 10.0) -> None:
        """Drop the queue, end the running answers before their next token, and end the thread."""
        self._drop_queue()
        if self._thread is not None and self._thread.is_alive():
            self._stopping.set()
            self._queue.put(None)
            self._thread.join(timeout)
        self._thread = None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def cancelled_waiting(self) -> int:
        """Queued jobs already cancelled (their clients left): they will be skipped, not run."""
        with self._queue.mutex:
            return sum(1 for job in self._queue.queue if job is not None and job.cancel.is_set())

    def image_not_supported(self, param: str) -> APIError:
        """The 400 for an image sent to a text-only model (``param``: the request field that held it)."""
        return APIError(400, f"this model reads no images (it is a text-only {self.spec.display_name} checkpoint)",
                        param=param, code="image_not_supported")

    def admit(self, request: GenerationRequest) -> Admitted:
        """Build ``request``'s prompt ids and check every limit; raises :class:`APIError` (400) for a
        request that cannot run. Needs no encoded image and does not touch the model's weights or cache,
        so it runs in the caller's thread while the worker generates."""
        if request.image is not None and not self.multimodal:
            raise self.image_not_supported("image")
        try:
            sampling = SamplingParams.for_family(self.spec, **request.sampling)
            banned = tuple(sampling.banned_ranges) + self._undecodable
            sampling = sampling.replace(banned_ranges=banned).validate()
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"bad sampling settings: {exc}") from None
        try:
            ids, image_start = build_prompt_ids(self.model, self.tokenizer, request.query, request.history,
                                                image=request.image is not None)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        limit = self.limits.prompt_limit(self.context)
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the {limit} allowed: shorten the "
                           "messages or the history", param="messages", code="context_length_exceeded")
        params = GenerationParams(max_new_tokens=request.max_new_tokens, max_length=request.max_length,
                                  stop_ids=self._stop_ids, sampling=sampling)
        try:
            budget = params.budget(len(ids), self.context)  # a prompt that leaves no room to answer
        except ValueError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None
        return Admitted(ids, image_start, params, budget)

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Job:
        """Admit ``request`` (a 400 :class:`APIError` if it cannot run) and queue it; a full queue raises
        :class:`QueueFullError` (503). Never blocks on the worker."""
        job = Job(request, sink, self.admit(request))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(self.limits.retry_after_s) from None
        return job

    # -- the thread --------------------------------------------------------------------------------------

    def _wait_for_job(self) -> Job | None:
        """Block until a job comes (None: stop). Idle under tensor parallelism, the followers get a
        heartbeat every ``channel.heartbeat_s`` seconds."""
        heartbeat = None if self.channel is None else time.monotonic() + self.channel.heartbeat_s
        while True:
            if self._stopping.is_set():
                return None
            timeout = self._poll_s
            if heartbeat is not None:
                timeout = max(0.0, heartbeat - time.monotonic()) if timeout is None else \
                    min(timeout, max(0.0, heartbeat - time.monotonic()))
            try:
                return self._queue.get(timeout=timeout)
            except queue.Empty:
                if heartbeat is not None and time.monotonic() >= heartbeat:
                    heartbeat = time.monotonic() + self.channel.heartbeat_s
                    try:
                        self.channel.heartbeat()
                    except Exception:  # a rank is gone: keep the worker (and its errors to clients) alive
                        log.exception("heartbeat to the other ranks failed")

    def _run(self) -> None:
        engine = self._fresh_engine()
        if self.limits.prefill_chunk is None and self.step_costs is None:
            engine = self._measure_prefill_chunk(engine)
        outputs: dict[int, RowOutput] = {}
        stopping = False

        def deliver(events: list[TokenEvent]) -> None:
            for event in events:
                output = outputs.get(event.id)
                if output is not None:
                    output.take(event)
                    if event.reason is not None:
                        output.reported = True  # the engine ended it itself

        try:
            while not (stopping and not outputs):
                newcomers: list[tuple[EngineRequest, torch.Tensor | None]] = []
                if not outputs and not stopping:
                    self.busy = False
                    job = self._wait_for_job()
                    if job is None:
                        break
                    stopping = self._join(job, outputs, newcomers)
                self.busy = True
                stopping = self._take_waiting(outputs, newcomers) or stopping
                if self._stopping.is_set():
                    for output in outputs.values():
                        output.finish("cancelled")
                ended = rows_to_end(outputs)
                for key in ended:
                    engine.end(key)
                if self.channel is not None:
                    self.channel.send_step(self.engine_shape, newcomers, ended)
                try:
                    # a newcomer's first token is sent before the running rows' decode forward
                    deliver(engine.step(early=deliver))
                except Exception:  # the batched forward failed: every row in the engine, never a trace
                    log.exception("generation failed")
                    engine = self._reset_engine(outputs)
                    continue
                for key in [key for key, output in outputs.items() if output.done and output.reported]:
                    del outputs[key]
                    self.served += 1
        finally:
            self.busy = False
            engine.close()
            self._drop_queue()
            if self.channel is not None:
                self.channel.close()  # the followers leave their loop

    def _measure_prefill_chunk(self, engine: ContinuousEngine) -> ContinuousEngine:
        """Measure the engine's step costs on synthetic prompts (every rank runs the same steps), set the
        prefill chunk that keeps a step within ``STEP_RATIO`` decode steps, and return a fresh engine of
        the new shape (the measured one's slots hold the synthetic tokens). A failed measurement keeps the
        probe's chunk: it is logged, never fatal."""

        step = stepper(engine)

        def run_step(newcomers: list[EngineRequest], ended: list) -> list[TokenEvent]:
            if self.channel is not None:  # the followers make the same calls
                self.channel.send_step(self.engine_shape, [(request, None) for request in newcomers], ended)
            return step(newcomers, ended)

        def prompt_ids(tokens: int) -> list[int]:
            return build_prompt_ids(self.model, self.tokenizer, " ".join(["a"] * tokens), [], image=False)[0]

        started = time.perf_counter()
        try:
            self.step_costs = measure_step_costs(engine, prompt_ids, run_step=run_step)
        except Exception:  # noqa: BLE001 - serve with the probe's chunk rather than not at all
            log.exception("measuring the step costs failed; prefill chunk %d", self.prefill_chunk)
        if self.step_costs is not None:
            self.prefill_chunk = self.step_costs.prefill_chunk(STEP_RATIO)
            log.info("prefill chunk %d tokens a step (%s; measured in %.1f s)", self.prefill_chunk,
                     self.step_costs.describe(), time.perf_counter() - started)
        return self._fresh_engine()

    def _reset_engine(self, outputs: dict[int, RowOutput]) -> ContinuousEngine:
        for output in outputs.values():
            output.fail(APIError(500, "internal error while generating", type="server_error"))
        self.served += len(outputs)
        outputs.clear()
        return self._fresh_engine()

    def _fresh_engine(self) -> ContinuousEngine:
        """Close the current engine (if any) and build an empty one of a new build (``engine_shape``)."""
        if self.engine is not None:
            self.engine.close()
        self._builds += 1
        self.engine = make_engine(self.model, self.engine_shape)
        return self.engine

    def _take_waiting(self, outputs: dict[int, RowOutput], newcomers: list) -> bool:
        """Move waiting jobs into the engine while it has room for them (continuous: a free slot; static:
        an empty engine, then up to every slot); True when the stop sentinel was met."""
        if self.scheduler == "static" and any(not output.done for output in outputs.values()) and not newcomers:
            return False
        while len(outputs) < self.rows:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            self._join(job, outputs, newcomers)
        return False

    def _join(self, job: Job | None, outputs: dict[int, RowOutput], newcomers: list) -> bool:
        """Hand ``job`` to the engine (its image encoded first); True for the stop sentinel."""
        if job is None:
            return True
        if job.cancel.is_set():  # the client left while the job waited
            self.skipped += 1
            job.emit(Event("done", finish_reason="cancelled"))
            return False
        admitted = job.admitted
        image = None
        if admitted.image_start is not None:
            try:
                image = self._encode_image(job.request)
            except APIError as exc:
                job.emit(Event("error", error=exc))
                return False
            except (ImageError, ValueError) as exc:
                job.emit(Event("error", error=APIError(400, f"bad image: {exc}", param="image",
                                                       code="invalid_image")))
                return False
            except Exception:  # never send the trace to the client
                log.exception("image encoding failed")
                job.emit(Event("error", error=APIError(500, "internal error while reading the image",
                                                       type="server_error")))
                return False
        self._next_id += 1
        key = self._next_id
        # Every row gets an explicit seed: followers must build the same generators (random for rows
        # without one, as a fresh generator would be).
        seed = admitted.params.sampling.seed
        request = EngineRequest(key, admitted.ids, admitted.params,
                                seed if seed is not None else random.SystemRandom().randrange(2**63),
                                admitted.image_start, image, job.request.image_key if image is not None else None)
        output = RowOutput(admitted.prompt_tokens, self.tokenizer, self.spec.postprocess, job.request.stop,
                           _emitter(job), job.cancel.is_set)
        self.engine.submit(request)
        outputs[key] = output
        newcomers.append((request, image))
        output.emit("start", prompt_tokens=output.prompt_tokens)
        return False

    # -- images (called from request threads) ------------------------------------------------------------

    def read_image(self, data: bytes) -> tuple[torch.Tensor, str]:
        """An image file's bytes -> (the model's pixel values, sha256 of the bytes), under the limits' byte,
        side, aspect and pixel bounds (raises :class:`ImageError`). For request threads: the full-size
        decoded image never outlives this call, and after a large one the freed buffers go back to the
        system (glibc would keep them in the thread's arena, and RSS would stay at its peak)."""
        limits = self.limits
        image, cost = None, len(data)
        try:
            image = load_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                               max_side=limits.max_image_side, max_aspect=limits.max_image_aspect)
            cost += 4 * image.width * image.height
            return self.prepare_image(image), hashlib.sha256(data).hexdigest()
        finally:
            del image
            if cost > _LARGE_IMAGE_BYTES:
                release_freed_memory()

    def prepare_image(self, image: Any) -> torch.Tensor:
        """A decoded image -> the model's pixel values ``[1, 3, H, W]`` (float32, CPU). Callers do this in
        their own thread, so that a queued request holds a few MB instead of a full-size decoded image."""
        return preprocess(image, image_size(self.model.config))

    @torch.inference_mode()
    def _encode_image(self, request: GenerationRequest) -> torch.Tensor:
        """The request's image embeddings ``[1, image_length, hidden]``, from the small cache when the same
        image (same ``image_key``) came recently."""
        key = request.image_key
        if key is not None and key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        pixels = request.image if isinstance(request.image, torch.Tensor) else self.prepare_image(request.image)
        device = next(self.model.parameters()).device
        embeds = self.model.encode_images(pixels.to(device))
        self.images_encoded += 1
        if key is not None:
            self._images[key] = embeds
            while len(self._images) > _IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)
        return embeds



def make_engine(model: nn.Module, shape: tuple[int, ...]) -> ContinuousEngine:
    """The engine of a worker (or of a follower rank) of ``shape`` = (rows, context, prefill chunk, build)."""
    rows, context, chunk = shape[:3]
    # The model's compiled decode step, when one was made (``visualglm serve --compile``): the same graphs
    # as batch generation and chat sessions on this model.
    return ContinuousEngine(model, max_rows=rows, context=context, prefill_chunk=chunk,
                            one_step_tokens=SHORT_PROMPT_TOKENS, compiled=compiled_decode_for(model))


def _default_kv_budget() -> int | None:
    """Half the memory the system reports available now (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return None


def _emitter(job: Job) -> Callable[..., None]:
    """``emit(kind, **fields)`` for ``job``'s sink."""
    return lambda kind, **fields: job.emit(Event(kind, **fields))


def load_model(model: str | Path | None, *, dtype: str | None = None, device: str | torch.device = "cpu",
               quantize: int | None = None, quantize_also: tuple[str, ...] = (), adapter: str | Path | None = None,
               tensor_parallel: bool = False) -> tuple[nn.Module, Any, str]:
    """Load ``model`` for serving with :func:`visualglm.demo.loading.load_model` (same arguments; None: the
    shipped demo model) and log how long it took. Returns (model, tokenizer, name)."""
    from visualglm.demo.loading import load_model as load

    started = time.perf_counter()
    loaded = load(model, dtype=dtype, device=device, quantize=quantize, quantize_also=quantize_also,
                  adapter=adapter, tensor_parallel=tensor_parallel)
    log.info("loaded %s in %.1f s", loaded.name, time.perf_counter() - started)
    return loaded


def load_worker(model: str | Path | None, *, dtype: str | None = None, device: str = "cpu",
                quantize: int | None = None, quantize_also: tuple[str, ...] = (), adapter: str | Path | None = None,
                limits: ServeLimits | None = None) -> Worker:
    """Load ``model`` (see :func:`load_model`) and return a started :class:`Worker`."""
    loaded, tokenizer, name = load_model(model, dtype=dtype, device=device, quantize=quantize,
                                         quantize_also=quantize_also, adapter=adapter)
    return Worker(loaded, tokenizer, name=name, limits=limits).start()
