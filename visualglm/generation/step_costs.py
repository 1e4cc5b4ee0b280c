"""What a step of the continuous engine costs on this machine, measured, and the prefill chunk that follows.

A step that carries a prompt's prefill beside decoding rows takes longer than a decode step: every running
stream waits for it. How much longer per prompt token depends on the machine far more than on the model: a
CPU with AMX tiles computes a 32-token chunk of a 150M-parameter model in about the time it reads the
weights, one with AVX-512 BF16 only in three to four times that (measured: 2-vCPU Xeon with AMX against
2-vCPU EPYC Zen 4, both in docs/serving.md). A fixed ``prefill_chunk`` is therefore right on one machine
and several times off on the next. :func:`measure_step_costs` runs a few steps of the engine itself, with
synthetic prompts, and :meth:`StepCosts.prefill_chunk` turns them into the largest chunk that keeps a
step beside ``max_rows - 1`` decoding rows within ``ratio`` times a lone row's decode step.

The measurement is a schedule like any other (submit, step, end), so under tensor parallelism the caller
replays it on every rank (``run_step``); only the clock of the caller's rank decides.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from visualglm.generation.continuous import ContinuousEngine, EngineRequest, TokenEvent
from visualglm.generation.engine import GenerationParams
from visualglm.generation.sampling import SamplingParams

# The floors. Short chat turns do not depend on the chunk: the server prefills up to
# ``serving.limits.SHORT_PROMPT_TOKENS`` new tokens in one step, ahead of long prompts. A causal prompt
# (GLM-4V) goes in token chunks inside the decode steps, which cost nothing per chunk beyond its tokens: 8.
# Measured on the GLM-4 shape on an AMD EPYC, a chunk of 10 gave a p95 gap at 80% load of 55 ms (1.9x the
# unloaded step) for the capacity that 16 gave with 64-85 ms. A prompt that attends both ways (ChatGLM-6B)
# goes in pieces of layers run as forwards of their own, each reading its layer's weights again: 16. On the
# ChatGLM shape a chunk of 9 took long prompts over so many steps that 80% load became more than the server
# could prefill (TTFT p50 3.2 s, p95 gap 94 ms, against 0.7 s and 77 ms at 16 and a similar rate).
SMALLEST_CHUNK = 8
SMALLEST_STAGED_CHUNK = 16
LARGEST_CHUNK = 256
PROBE_CHUNK = 32  # the chunk the prefill is measured with


@dataclass(frozen=True)
class StepCosts:
    """Seconds: ``alone`` a decode step of one row; ``loaded`` one of ``rows`` rows; ``per_token`` what
    each prompt token of a prefill stage adds to a step beside those rows. ``token_chunks``: the long prompt
    went in token chunks (a causal model's), else in stages of layers."""

    alone: float
    loaded: float
    rows: int
    per_token: float
    token_chunks: bool = False

    def prefill_chunk(self, ratio: float) -> int:
        """Prompt tokens a step may carry so that it costs at most ``ratio`` times a lone row's decode step
        (at least ``SMALLEST_CHUNK`` for token chunks, ``SMALLEST_STAGED_CHUNK`` for stages of layers; at
        most ``LARGEST_CHUNK``)."""
        smallest = SMALLEST_CHUNK if self.token_chunks else SMALLEST_STAGED_CHUNK
        room = ratio * self.alone - self.loaded
        if self.per_token <= 0:
            return LARGEST_CHUNK
        return max(smallest, min(LARGEST_CHUNK, math.floor(room / self.per_token + 1e-6)))

    def describe(self) -> str:
        return (f"decode step {self.alone * 1e3:.1f} ms alone, {self.loaded * 1e3:.1f} ms with {self.rows} rows; "
                f"{self.per_token * 1e3:.2f} ms per prompt token beside them")


def stepper(engine: ContinuousEngine) -> Callable[[list[EngineRequest], list[Hashable]], list[TokenEvent]]:
    """``run_step(newcomers, ended)`` on ``engine``: submit the newcomers, end the ended, one step."""

    def run_step(newcomers: list[EngineRequest], ended: list[Hashable]) -> list[TokenEvent]:
        for request in newcomers:
            engine.submit(request)
        for key in ended:
            engine.end(key)
        return engine.step()
    return run_step


def measure_step_costs(engine: ContinuousEngine, prompt_ids: Callable[[int], list[int]], *,
                       run_step: Callable[[list[EngineRequest], list[Hashable]], list[TokenEvent]] | None = None,
                       samples: tuple[int, int] = (5, 15), seconds: float = 1.0) -> StepCosts | None:
    """Time ``engine``'s steps on synthetic prompts (``prompt_ids(n)``: prompt ids of about ``n`` tokens,
    the model's template included): a lone row decoding, ``max_rows - 1`` rows decoding, and those rows
    with a long prompt prefilled beside them at ``PROBE_CHUNK`` tokens a step. Decode steps are timed
    ``samples`` = (at least, at most) times, more while under ``seconds`` a phase (a busy machine's steps
    vary: medians). ``run_step(newcomers, ended)`` submits, ends and steps (default: on ``engine``); every
    request is ended before it returns, but the slots keep the synthetic tokens: build a fresh engine
    after it. None when the engine cannot carry a prefill beside decoding rows (one row) or the context is
    too short to measure it."""
    step = run_step or stepper(engine)
    rows = engine.max_rows - 1
    fewest, most = samples
    long_prompt = prompt_ids(8 * PROBE_CHUNK)
    if len(long_prompt) + 1 >= engine.context:
        long_prompt = prompt_ids(4 * PROBE_CHUNK)
    short = prompt_ids(8)
    answer = 2 * most + 4 + math.ceil(len(long_prompt) / PROBE_CHUNK)
    if rows < 1 or max(len(long_prompt) + 1, len(short) + answer) >= engine.context:
        return None
    greedy = SamplingParams(do_sample=False)
    keys: list[Hashable] = []

    def request(name: str, ids: list[int], tokens: int) -> EngineRequest:
        key = ("step-costs", name)
        keys.append(key)
        return EngineRequest(key, ids, GenerationParams(max_new_tokens=tokens, sampling=greedy, stop_ids=()))

    def timed(newcomers: list[EngineRequest] = (), ended: list[Hashable] = ()) -> tuple[float, list[TokenEvent]]:
        start = time.perf_counter()
        events = step(list(newcomers), list(ended))
        return time.perf_counter() - start, events

    def decode_steps() -> float:
        """The median of decode-only steps (after one: a new batch shape's first step may be slower)."""
        timed()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < fewest or (len(times) < most and time.perf_counter() - started < seconds):
            times.append(timed()[0])
        return statistics.median(times)

    saved = engine.prefill_chunk
    engine.prefill_chunk = PROBE_CHUNK
    try:
        alone_row = request("alone", short, answer)
        timed([alone_row])  # its prefill (and first token)
        alone = decode_steps()
        # The lone row ends as the others come: exactly ``rows`` decode from then on.
        timed([request(f"row {index}", short, answer) for index in range(rows)], [alone_row.id])
        while engine.waiting or engine.prefill is not None:
            timed()
        loaded = decode_steps()
        reused = engine.stats.reused_tokens
        newcomer = request("prompt", long_prompt, 1)
        carrying, events = timed([newcomer])
        token_chunks = engine.prefill is not None and bool(engine.prefill.later)
        steps = 1
        while not any(event.id == newcomer.id for event in events):
            elapsed, events = timed()
            carrying += elapsed
            steps += 1
        # What the steps took beyond the rows' decode steps, over the prompt tokens computed (a causal one
        # may reuse the short prompts' leading tokens): the mean, as stages of a layer-staged prompt differ.
        computed = len(long_prompt) - (engine.stats.reused_tokens - reused)
        return StepCosts(alone, loaded, rows, max(0.0, carrying - steps * loaded) / max(1, computed), token_chunks)
    finally:
        engine.prefill_chunk = saved
        step([], list(keys))
