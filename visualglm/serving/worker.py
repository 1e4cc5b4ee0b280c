"""One model, one worker thread, a bounded queue of generation jobs, and cancellation between tokens.

The HTTP API and the web UI both submit :class:`GenerationRequest` s here. A request is stateless (it
carries its whole history). ``submit`` admits it first, in the caller's thread: it builds the prompt ids
and checks every limit (prompt tokens, length budget, sampling settings, an image for a text-only model),
so a request that cannot run is refused with a 400 at once and never takes a queue slot. The model (and
its KV cache) is only ever touched by the worker thread, one job at a time. Jobs report through a
``sink`` callback (called on the worker thread) with :class:`Event` s: ``start`` once the prompt is accepted,
``delta`` for each piece of text, then exactly one of ``done`` or ``error``. A job whose ``cancel`` flag is
set (the client went away) stops before its next token, or is skipped if it has not started.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visualglm.generation.chat import build_prompt_ids, undecodable_ranges
from visualglm.generation.detok import DecodeStream
from visualglm.generation.engine import GenerationParams, generate_steps
from visualglm.generation.sampling import SamplingParams, make_generator
from visualglm.image import ImageError, load_image, preprocess
from visualglm.serving.protocol import APIError, ServeLimits

log = logging.getLogger("visualglm.serving")

FAMILY_SAMPLING = {"chatglm": SamplingParams.chatglm6b, "visualglm": SamplingParams.visualglm,
                    "glm4v": SamplingParams.glm4v}
_IMAGE_CACHE_SIZE = 4  # encoded images kept: multi-turn clients resend the same image every turn


@dataclass
class GenerationRequest:
    """One answer to generate. ``sampling`` overrides the family's reference defaults (SamplingParams
    fields); ``max_length`` is the reference's prompt + answer total, ``max_new_tokens`` the answer alone;
    ``image`` is a decoded PIL image and ``image_key`` (e.g. a hash of its bytes) lets the worker reuse
    the encoding of an image it saw recently."""

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

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


class Job:
    """A submitted, admitted request; ``cancel`` may be set from any thread."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None],
                 admitted: Admitted | None = None) -> None:
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
    """Runs jobs one at a time on a daemon thread. ``submit`` never blocks: a full queue raises
    :class:`QueueFullError` (503)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str = "visualglm",
                 limits: ServeLimits | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.limits = limits or ServeLimits()
        self.family: str = model.config.family
        self.multimodal = hasattr(model, "encode_images")
        self.context: int = model.config.max_sequence_length
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.limits.max_queue)
        self._thread: threading.Thread | None = None
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.busy = False
        self.served = 0  # jobs run (answered, failed or cancelled while running)
        self.skipped = 0  # jobs dropped before they started: their client had left
        self.images_encoded = 0
        # The output layer has rows the tokenizer cannot decode (padding): never sample them (as ChatSession).
        vocab = model.get_input_embeddings().num_embeddings
        self._undecodable = tuple(undecodable_ranges(tokenizer.known_ids(), vocab))
        config = model.config
        self._stop_ids = tuple(config.stop_ids) if self.family == "glm4v" else (config.eos_token_id,)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Worker:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="visualglm-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running job's current token, drop the queue, and end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit(Event("done", finish_reason="cancelled"))
        if self._thread is not None and self._thread.is_alive():
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

    def admit(self, request: GenerationRequest) -> Admitted:
        """Build ``request``'s prompt ids and check every limit; raises :class:`APIError` (400) for a
        request that cannot run. Needs no encoded image and does not touch the model's weights or cache,
        so it runs in the caller's thread while the worker generates."""
        if request.image is not None and not self.multimodal:
            raise APIError(400, "this model reads no images (it is a text-only ChatGLM-6B checkpoint)",
                           param="image", code="image_not_supported")
        try:
            sampling = FAMILY_SAMPLING[self.family]().replace(**request.sampling)
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
            params.budget(len(ids), self.context)  # a prompt that leaves no room to answer
        except ValueError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None
        return Admitted(ids, image_start, params)

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

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():  # the client left while the job waited
                self.skipped += 1
                job.emit(Event("done", finish_reason="cancelled"))
                continue
            self.busy = True
            try:
                self._generate(job)
            except APIError as exc:
                job.emit(Event("error", error=exc))
            except (ImageError, ValueError) as exc:
                job.emit(Event("error", error=APIError(400, str(exc))))
            except Exception:  # never lose the worker; never send the trace to the client
                log.exception("generation failed")
                job.emit(Event("error", error=APIError(500, "internal error while generating",
                                                       type="server_error")))
            finally:
                self.busy = False
                self.served += 1

    def _encode_image(self, request: GenerationRequest) -> torch.Tensor:
        """The request's image embeddings ``[1, image_length, hidden]``, from the small cache when the same
        image (same ``image_key``) came recently."""
        key = request.image_key
        if key is not None and key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        config = self.model.config
        size = config.vision_config.image_size if self.family == "glm4v" else config.eva_config.image_size
        size = (size, size) if isinstance(size, int) else (size[0], size[1])
        device = next(self.model.parameters()).device
        embeds = self.model.encode_images(preprocess(load_image(request.image), size).to(device))
        self.images_encoded += 1
        if key is not None:
            self._images[key] = embeds
            while len(self._images) > _IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)
        return embeds

    @torch.inference_mode()
    def _generate(self, job: Job) -> None:
        request, admitted = job.request, job.admitted
        if admitted is None:  # submitted by hand, not through submit()
            admitted = self.admit(request)
        ids, image_start, params = admitted.ids, admitted.image_start, admitted.params
        embeds = None
        if image_start is not None:
            image = self._encode_image(request)
            embeds = self.model.embed_with_images(torch.tensor([ids], device=image.device), image, [image_start])
        job.emit(Event("start", prompt_tokens=len(ids)))
        decoded = DecodeStream(self.tokenizer, stop=request.stop,
                               postprocess="glm4" if self.family == "glm4v" else "chatglm")
        generator = make_generator(params.sampling.seed, next(self.model.parameters()).device)
        steps = generate_steps(self.model, [ids], params=params, generator=generator, keep_cache=True,
                               inputs_embeds=embeds)
        count, finish = 0, "length"
        try:
            for step in steps:
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                if bool(step.finished[0]):
                    finish = "stop"
                    break
                count += 1
                delta = decoded.push(int(step.tokens[0]))
                if delta:
                    job.emit(Event("delta", text=delta))
                if decoded.stopped:
                    finish = "stop"
                    break
        finally:
            steps.close()  # a generator left mid-way: release it now, not at garbage collection
        if finish != "cancelled":
            tail = decoded.flush()
            if tail:
                job.emit(Event("delta", text=tail))
        job.emit(Event("done", prompt_tokens=len(ids), completion_tokens=count, finish_reason=finish))


def load_worker(model: str | Path | None, *, quant: int | None = None, dtype: str | None = None,
                device: str = "cpu", adapter: str | Path | None = None, limits: ServeLimits | None = None
                ) -> Worker:
    """Load ``model`` (default: the shipped demo model), with a LoRA / P-tuning ``adapter`` folder if given,
    and return a started :class:`Worker`."""
    from visualglm.checkpoint.load import load
    from visualglm.checkpoint.tokenizer import load_tokenizer
    from visualglm.demo import DEMO_MODEL_NAME, resolve_model

    path = resolve_model(model)
    name = DEMO_MODEL_NAME if not model else (Path(str(model)).name or str(model))
    started = time.perf_counter()
    tokenizer = load_tokenizer(path)
    loaded = load(path, dtype=dtype, device=device, quantize=quant)
    if adapter:
        from visualglm.peft import apply_adapter

        apply_adapter(loaded, adapter)
    log.info("loaded %s in %.1f s", name, time.perf_counter() - started)
    return Worker(loaded, tokenizer, name=name, limits=limits).start()
