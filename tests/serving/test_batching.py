"""The worker batches waiting requests: each row answers as it would alone (text, usage, finish reason),
rows end on their own (budget, stop string, client gone), seeds reproduce, and failures stay contained."""

from __future__ import annotations

import dataclasses
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from visualglm.serving.worker import Event, GenerationRequest, Worker

from .conftest import TEST_LIMITS, _load, probe, running

GREEDY = {"do_sample": False}
# A prefill budget that admits every prompt of _requests() in one group: they then decode together.
BATCH = dataclasses.replace(TEST_LIMITS, max_batch=8, max_queue=8, prefill_chunk=256)
ALONE = dataclasses.replace(BATCH, max_batch=1)


@pytest.fixture(scope="module")
def glm4v_model(glm4v_checkpoint):
    return _load(glm4v_checkpoint)


@pytest.fixture(params=["visualglm", "glm4v"])
def model_and_tokenizer(request, visual_model, glm4v_model):
    return visual_model if request.param == "visualglm" else glm4v_model


def _image(color) -> Image.Image:
    return Image.new("RGB", (40, 30), color)


class Collected:
    """One job's events."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.finished = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind in ("done", "error"):
            self.finished.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "delta")

    @property
    def last(self) -> Event:
        return self.events[-1]

    def summary(self) -> tuple:
        last = self.last
        return (self.text, last.kind, last.finish_reason, last.prompt_tokens, last.completion_tokens)


def _run(model_and_tokenizer, requests: list[GenerationRequest], limits=BATCH, on_event=None
         ) -> tuple[list[Collected], Worker]:
    """Submit every request before the worker starts (so that they wait together), run, collect."""
    worker = Worker(*model_and_tokenizer, name="tiny", limits=limits)
    sinks = []
    for request in requests:
        sink = Collected()
        job = worker.submit(request, sink if on_event is None else on_event(sink, len(sinks)))
        sink.job = job
        sinks.append(sink)
    worker.start()
    try:
        for sink in sinks:
            assert sink.finished.wait(120), "a job did not finish"
    finally:
        worker.stop()
    return sinks, worker


def _requests() -> list[GenerationRequest]:
    red, blue = _image((200, 30, 30)), _image((20, 40, 220))
    return [
        GenerationRequest("hello", sampling=GREEDY, max_new_tokens=5),
        GenerationRequest("what is in the picture? describe it", image=red, image_key="red", sampling=GREEDY,
                          max_new_tokens=12),
        GenerationRequest("你好，请告诉我", history=[("q one", "answer one")], sampling=GREEDY, max_new_tokens=9),
        GenerationRequest("colour?", image=blue, image_key="blue", sampling=GREEDY, max_new_tokens=20),
    ]


def test_batched_greedy_answers_equal_each_request_alone(model_and_tokenizer) -> None:
    batched, worker = _run(model_and_tokenizer, _requests())
    assert worker.largest_batch >= 3  # they join one step after another and run together
    alone, single = _run(model_and_tokenizer, _requests(), limits=ALONE)
    assert single.largest_batch == 1
    for got, want in zip(batched, alone, strict=True):
        assert got.summary() == want.summary()
        assert [e.kind for e in got.events][0] == "start" and got.last.kind == "done"
    # Usage per row: its own prompt, its own answer; rows that ran out of budget say so.
    budgets = [5, 12, 9, 20]
    for got, budget in zip(batched, budgets, strict=True):
        assert got.last.completion_tokens <= budget
        assert got.last.finish_reason == ("length" if got.last.completion_tokens == budget else "stop")
    assert len({got.last.prompt_tokens for got in batched}) == 4
    assert any(got.last.finish_reason == "length" for got in batched)


def test_stop_strings_end_their_row_only(visual_model) -> None:
    free, _ = _run(visual_model, _requests(), limits=ALONE)
    stop = free[3].text[4:6]  # two characters from the middle of the long answer
    assert len(stop) == 2 and stop not in free[3].text[:5]
    requests = _requests()
    requests[3].stop = (stop,)
    batched, worker = _run(visual_model, requests)
    assert worker.largest_batch >= 3
    assert batched[3].text == free[3].text[: free[3].text.index(stop)] and batched[3].last.finish_reason == "stop"
    for row in (0, 1, 2):
        assert batched[row].summary() == free[row].summary()


def test_a_cancelled_row_leaves_the_batch_and_the_others_finish(visual_model) -> None:
    model = visual_model[0]
    sizes: list[int] = []  # rows of each decode step (one token per row)

    def count(module, args) -> None:
        if args[0] is not None and args[0].shape[1] == 1:
            sizes.append(int(args[0].shape[0]))

    handle = model.register_forward_pre_hook(count)

    def cancel_after_two_deltas(sink: Collected, index: int):
        def on_event(event: Event) -> None:
            sink(event)
            if index == 3 and sum(e.kind == "delta" for e in sink.events) == 2:
                sink.job.cancel.set()  # the client goes away (called on the worker thread, between tokens)
        return on_event

    try:
        batched, worker = _run(visual_model, _requests(), on_event=cancel_after_two_deltas)
    finally:
        handle.remove()
    alone, _ = _run(visual_model, _requests(), limits=ALONE)
    assert batched[3].last.finish_reason == "cancelled"
    assert sum(e.kind == "delta" for e in batched[3].events) == 2  # nothing more after the cancel
    for row in (0, 1, 2):
        assert batched[row].summary() == alone[row].summary()
    # The cancelled row (the last to join, in the highest slot) stopped being computed: the decode batch
    # shrank right after, while the others still ran.
    full = sizes.index(4)
    shrunk = full + sizes[full:].index(3)
    assert max(sizes) == 4 and max(sizes[shrunk:]) <= 3


def test_seeded_requests_reproduce_batched_or_not(visual_model) -> None:
    def requests() -> list[GenerationRequest]:
        sampled = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
        return [GenerationRequest("hello", sampling={**sampled, "seed": 7}, max_new_tokens=16),
                GenerationRequest("tell me a story", sampling={**sampled, "seed": 8}, max_new_tokens=16),
                GenerationRequest("hello", sampling={**sampled, "seed": 9}, max_new_tokens=16)]

    first, _ = _run(visual_model, requests())
    again, _ = _run(visual_model, requests())
    alone, _ = _run(visual_model, requests(), limits=ALONE)
    assert [s.summary() for s in first] == [s.summary() for s in again] == [s.summary() for s in alone]
    assert first[0].text != first[2].text  # same prompt, different seeds: the seeds do matter


def test_a_bad_image_fails_its_request_only(visual_model) -> None:
    requests = _requests()
    requests[1].image, requests[1].image_key = io.BytesIO(b"not an image"), None
    batched, _ = _run(visual_model, requests)
    alone, _ = _run(visual_model, _requests(), limits=ALONE)
    error = batched[1].last
    assert error.kind == "error" and error.error.status == 400 and error.error.code == "invalid_image"
    for row in (0, 2, 3):
        assert batched[row].summary() == alone[row].summary()


def test_a_failing_forward_fails_the_whole_batch_and_the_worker_lives_on(visual_model) -> None:
    model = visual_model[0]
    calls = {"n": 0}

    def explode(module, args) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure /secret/path")

    handle = model.register_forward_pre_hook(explode)
    worker = Worker(*visual_model, name="tiny", limits=BATCH)
    sinks = [Collected() for _ in range(3)]
    try:
        for sink, request in zip(sinks, _requests(), strict=False):
            worker.submit(request, sink)
        worker.start()
        for sink in sinks:
            assert sink.finished.wait(60)
        for sink in sinks:
            assert sink.last.kind == "error" and sink.last.error.status == 500
            assert "secret" not in sink.last.error.message and sink.last.error.type == "server_error"
        handle.remove()
        after = Collected()
        worker.submit(GenerationRequest("hello", sampling=GREEDY, max_new_tokens=3), after)
        assert after.finished.wait(60) and after.last.kind == "done"
    finally:
        handle.remove()
        worker.stop()


def test_concurrent_http_requests_are_batched(visual_model) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    with running(visual_model, limits=BATCH) as (url, worker), probe(visual_model[0], gated=True) as gate:
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))) for _ in range(4)]
        threads[0].start()
        deadline = time.monotonic() + 30
        while not worker.busy:  # the first request runs alone and waits at the gate
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for thread in threads[1:]:
            thread.start()
        while worker.queued < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gate.gate.set()
        for thread in threads:
            thread.join(60)
    assert [r.status_code for r in results] == [200] * 4
    assert len({r.json()["choices"][0]["message"]["content"] for r in results}) == 1
    assert worker.largest_batch >= 3  # the three that waited joined the first one's batch


def test_rows_of_any_length_run_together_each_in_its_own_context(visual_model) -> None:
    # Each row has a slot of the whole context of its own: a long prompt and a long answer run side by side
    # (a single left-padded batch would need the longest prompt plus the longest answer for every row).
    limits = dataclasses.replace(BATCH, max_prompt_tokens=None)
    requests = [GenerationRequest("hi", sampling=GREEDY, max_new_tokens=100),
                GenerationRequest("word " * 60, sampling=GREEDY, max_new_tokens=20)]
    together, worker = _run(visual_model, requests, limits=limits)
    assert worker.largest_batch == 2
    alone, _ = _run(visual_model, requests, limits=dataclasses.replace(limits, max_batch=1))
    assert [s.summary() for s in together] == [s.summary() for s in alone]


def test_without_a_prefill_chunk_the_worker_measures_one(model_and_tokenizer) -> None:
    from visualglm.generation.step_costs import LARGEST_CHUNK, SMALLEST_CHUNK

    measured, worker = _run(model_and_tokenizer, _requests(), limits=dataclasses.replace(BATCH, prefill_chunk=None))
    assert worker.step_costs is not None and worker.step_costs.rows == BATCH.max_batch - 1
    assert SMALLEST_CHUNK <= worker.prefill_chunk <= LARGEST_CHUNK
    # The engine that served is a fresh one of the measured shape: it saw the four requests only.
    assert worker.engine_shape[2] == worker.engine.prefill_chunk == worker.prefill_chunk
    assert worker.engine.stats.prefills == 4
    given, fixed = _run(model_and_tokenizer, _requests(), limits=dataclasses.replace(BATCH, prefill_chunk=24))
    assert fixed.step_costs is None and fixed.engine.prefill_chunk == 24
    assert [got.summary() for got in measured] == [got.summary() for got in given]


def test_the_servers_engine_prefills_a_short_prompt_in_one_step_whatever_the_chunk(glm4v_model) -> None:
    from visualglm.serving.limits import SHORT_PROMPT_TOKENS
    from visualglm.serving.worker import make_engine

    model = glm4v_model[0]
    assert make_engine(model, (2, 64, 4, 1)).one_step_tokens == SHORT_PROMPT_TOKENS
    assert make_engine(model, (2, 64, 40, 1)).one_step_tokens == 80  # twice a larger chunk
