"""The prefill chunk measured from the engine's own steps: the arithmetic, what each phase times, and the
engine left clean."""

from __future__ import annotations

import statistics
import time

import pytest

from visualglm.generation.continuous import ContinuousEngine
from visualglm.generation.step_costs import (
    LARGEST_CHUNK,
    SMALLEST_CHUNK,
    SMALLEST_STAGED_CHUNK,
    StepCosts,
    measure_step_costs,
)

from ..conftest import random_chatglm

GMASK, SOP = 1001, 1004


@pytest.fixture(scope="module")
def text_model():
    return random_chatglm(seed=5)


def _prompt(tokens: int) -> list[int]:
    return [20 + index % 400 for index in range(tokens)] + [GMASK, SOP]


def test_the_chunk_fills_the_room_a_step_has_left() -> None:
    # 2 x 20 ms = 40 ms a step may take; 25 ms go to the rows' decode step; 15 ms / 0.5 ms = 30 tokens.
    assert StepCosts(alone=0.020, loaded=0.025, rows=7, per_token=0.0005).prefill_chunk(2.0) == 30
    assert StepCosts(alone=0.020, loaded=0.025, rows=7, per_token=0.0005).prefill_chunk(1.75) == 20
    # Little room, none (the rows alone take more than the target), or a machine far too slow: the smallest,
    # 16 for prompts staged by layers, 8 for token chunks.
    assert StepCosts(alone=0.020, loaded=0.025, rows=7, per_token=0.0005).prefill_chunk(1.5) == 16
    assert StepCosts(alone=0.020, loaded=0.025, rows=7, per_token=0.0005, token_chunks=True).prefill_chunk(1.5) == 10
    assert SMALLEST_STAGED_CHUNK == 16 and SMALLEST_CHUNK == 8
    for chunks in (False, True):
        smallest = SMALLEST_CHUNK if chunks else SMALLEST_STAGED_CHUNK
        assert StepCosts(0.020, 0.025, 7, 0.0005, chunks).prefill_chunk(1.3) == smallest
        assert StepCosts(0.020, 0.045, 7, 0.0005, chunks).prefill_chunk(2.0) == smallest
        assert StepCosts(0.020, 0.025, 7, 0.01, chunks).prefill_chunk(2.0) == smallest
    # Prompt tokens that cost (almost) nothing: the largest.
    assert StepCosts(alone=0.020, loaded=0.025, rows=7, per_token=0.0).prefill_chunk(2.0) == LARGEST_CHUNK
    assert StepCosts(alone=0.020, loaded=0.025, rows=7, per_token=1e-7).prefill_chunk(2.0) == LARGEST_CHUNK


def test_each_phase_times_the_steps_it_claims(text_model) -> None:
    """Steps made slow by known amounts (by how many rows decode and whether a prefill is pending) are read
    back: one row, the loaded rows, and the prefill's cost per token of the probe chunk."""
    engine = ContinuousEngine(text_model, max_rows=4, context=512, prefill_chunk=20)
    seen: list[tuple[int, bool, float]] = []  # rows decoding, a prefill pending, seconds

    def run_step(newcomers, ended):
        start = time.perf_counter()
        for request in newcomers:
            engine.submit(request)
        for key in ended:
            engine.end(key)
        decoding = sum(row is not None and row.last is not None for row in engine.rows)
        prefilling = bool(engine.waiting) or engine.prefill is not None
        time.sleep((0.060 if decoding > 1 else 0.020) + (0.048 if prefilling and decoding else 0.0))
        events = engine.step()
        seen.append((decoding, prefilling, time.perf_counter() - start))
        return events

    costs = measure_step_costs(engine, _prompt, run_step=run_step)
    assert costs.rows == 3
    # The figures are the medians of the steps of their kind (each phase's first step left out).
    alone = [seconds for rows, prefilling, seconds in seen if (rows, prefilling) == (1, False)]
    loaded = [seconds for rows, prefilling, seconds in seen if (rows, prefilling) == (3, False)]
    assert len(alone) >= 6 and len(loaded) >= 6
    assert costs.alone == pytest.approx(statistics.median(alone[1:]), abs=0.002)
    assert costs.loaded == pytest.approx(statistics.median(loaded[1:-1]), abs=0.002)
    assert 0.020 <= costs.alone < costs.loaded
    assert not costs.token_chunks  # a ChatGLM prompt attends both ways: staged by layers
    # 48 ms more for 32 tokens a step: 1.5 ms a token, with the tiny model's own prompt cost (and the noise
    # of a machine idling in the sleeps, up to ~15 ms a step) on top; not subtracting the rows' step would
    # give 3.4 ms or more.
    assert 0.048 / 32 * 0.8 < costs.per_token < 0.048 / 32 * 2
    assert sum(prefilling for rows, prefilling, _ in seen if rows == 3) >= 256 // 32
    # Every synthetic request has ended and the probe's chunk is undone.
    assert engine.running == 0 and not engine.waiting and engine.prefill is None
    assert engine.prefill_chunk == 20


def test_unmeasurable_engines_give_none(text_model) -> None:
    assert measure_step_costs(ContinuousEngine(text_model, max_rows=1, context=512), _prompt) is None
    assert measure_step_costs(ContinuousEngine(text_model, max_rows=4, context=100), _prompt) is None


def test_a_causal_models_long_prompt_is_measured_in_token_chunks(glm4v_checkpoint) -> None:
    import visualglm
    from visualglm.generation.chat import build_prompt_ids

    model, tokenizer = visualglm.load(glm4v_checkpoint, progress=False), visualglm.load_tokenizer(glm4v_checkpoint)
    engine = ContinuousEngine(model, max_rows=3, context=1024)

    def prompt_ids(tokens: int) -> list[int]:
        return build_prompt_ids(model, tokenizer, " ".join(["a"] * tokens), [], image=False)[0]

    costs = measure_step_costs(engine, prompt_ids, samples=(3, 3), seconds=0.0)
    assert costs is not None and costs.token_chunks and costs.rows == 2
