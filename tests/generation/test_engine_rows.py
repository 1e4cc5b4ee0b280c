"""Per-row generation (the server's batches): each row its own params, generator, stop ids and budget; rows
the caller ends, and rows dropped from the batch, leave the others' tokens unchanged."""

from __future__ import annotations

import pytest
import torch

from visualglm.generation.engine import GenerationParams, generate_rows, generate_steps
from visualglm.generation.sampling import SamplingParams, make_generator

from ..conftest import random_chatglm

GMASK, SOP = 1001, 1004
PROMPTS = [[20, 21, 22, 23, GMASK, SOP], [30, 31, GMASK, SOP], [40, 41, 42, 43, 44, 45, 46, GMASK, SOP]]
GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def model():
    return random_chatglm(tie_word_embeddings=False, seed=3)


def _alone(model, prompt, params: GenerationParams, seed: int | None = None) -> list[int]:
    """One prompt, the old single-params call: its answer tokens (stop id excluded)."""
    out = []
    generator = make_generator(seed) if seed is not None else None
    for step in generate_steps(model, [prompt], params=params, generator=generator):
        if bool(step.finished[0]):
            break
        out.append(int(step.tokens[0]))
    return out


def _rows(steps) -> tuple[list[list[int]], list[str]]:
    """Per-row answer tokens and finish reasons from per-row steps."""
    answers: list[list[int]] | None = None
    reasons: list[str | None] = []
    for step in steps:
        if answers is None:
            answers, reasons = [[] for _ in step.reasons], [None] * len(step.reasons)
        for row, reason in enumerate(step.reasons):
            if reasons[row] is not None:
                continue
            if reason is None:
                answers[row].append(int(step.tokens[row]))
            else:
                reasons[row] = reason
    return answers, [r or "length" for r in reasons]


def test_each_row_equals_its_prompt_alone(model) -> None:
    params = [GenerationParams(max_new_tokens=n, sampling=GREEDY) for n in (3, 7, 5)]
    answers, reasons = _rows(generate_rows(model, PROMPTS, params))
    assert answers == [_alone(model, p, q) for p, q in zip(PROMPTS, params, strict=True)]
    assert [len(a) for a in answers] == [3, 7, 5] and reasons == ["length"] * 3


def test_max_length_counts_each_rows_own_prompt(model) -> None:
    params = [GenerationParams(max_length=len(p) + 4, sampling=GREEDY) for p in PROMPTS]
    answers, _ = _rows(generate_rows(model, PROMPTS, params))
    assert [len(a) for a in answers] == [4, 4, 4]


def test_stop_ids_are_per_row(model) -> None:
    free = _alone(model, PROMPTS[0], GenerationParams(max_new_tokens=6, sampling=GREEDY))
    stop = free[2]
    params = [GenerationParams(max_new_tokens=6, stop_ids=(stop,), sampling=GREEDY),
              GenerationParams(max_new_tokens=6, sampling=GREEDY)]
    answers, reasons = _rows(generate_rows(model, PROMPTS[:2], params))
    assert answers[0] == free[: free.index(stop)] and reasons[0] == "stop"
    assert answers[1] == _alone(model, PROMPTS[1], params[1]) and reasons[1] == "length"


@pytest.mark.parametrize("drop", [False, True])
def test_ended_rows_stop_and_the_others_go_on(model, drop: bool) -> None:
    params = [GenerationParams(max_new_tokens=8, sampling=GREEDY) for _ in PROMPTS]
    seen = {"steps": 0}

    def end_rows() -> list[int]:
        seen["steps"] += 1
        return [1] if seen["steps"] == 2 else []

    steps = []
    for step in generate_rows(model, PROMPTS, params, end_rows=end_rows, drop_finished=drop, keep_cache=True):
        steps.append(step)
        if drop and len(steps) == 4:  # after the end: row 1 is gone from the batch and its cache
            assert model.kv_cache_size()[0] == 2
    answers, reasons = _rows(steps)
    assert reasons == ["length", "ended", "length"]
    assert len(answers[1]) == 2 and answers[1] == _alone(model, PROMPTS[1], params[1])[:2]
    for row in (0, 2):
        assert answers[row] == _alone(model, PROMPTS[row], params[row])
    assert all(int(s.tokens[1]) == model.config.pad_token_id for s in steps[2:])
    model.delete_kv_cache()


def test_seeded_rows_sample_as_they_would_alone(model) -> None:
    sampling = [SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=s) for s in (11, 12, 13)]
    params = [GenerationParams(max_new_tokens=6, sampling=s) for s in sampling]
    answers, _ = _rows(generate_rows(model, PROMPTS, params))
    alone = [_alone(model, p, q, seed=s.seed) for p, q, s in zip(PROMPTS, params, sampling, strict=True)]
    assert answers == alone
    again, _ = _rows(generate_rows(model, PROMPTS, params, generators=[make_generator(s.seed) for s in sampling]))
    assert again == answers
    # Different seeds do pick different tokens here (the check above is not vacuous).
    assert len({tuple(a) for a in _rows(generate_rows(model, [PROMPTS[0]] * 3, params))[0]}) > 1


def test_per_row_argument_errors(model) -> None:
    params = [GenerationParams(max_new_tokens=2)] * 2
    with pytest.raises(ValueError, match="per-row params"):
        list(generate_rows(model, PROMPTS[:2], params[0], end_rows=lambda: []))
    with pytest.raises(ValueError, match="2 GenerationParams for 3 prompts"):
        list(generate_rows(model, PROMPTS, params))
    with pytest.raises(ValueError, match="one generator per row"):
        list(generate_rows(model, PROMPTS[:2], params, generators=torch.Generator()))
    with pytest.raises(ValueError, match="leaves no room"):
        list(generate_rows(model, PROMPTS[:2], [params[0], GenerationParams(max_length=4)]))


@pytest.mark.parametrize("drop", [False, True])
def test_a_row_whose_token_cannot_be_chosen_ends_alone(model, drop: bool) -> None:
    # Row 1 bans every token: no token can be chosen for it. It ends with "error" at the first step; the
    # other rows generate what they generate alone.
    vocab = model.config.vocab_size
    params = [GenerationParams(max_new_tokens=5, sampling=GREEDY),
              GenerationParams(max_new_tokens=5, sampling=GREEDY.replace(banned_ranges=((0, vocab),))),
              GenerationParams(max_new_tokens=5, sampling=GREEDY)]
    steps = list(generate_rows(model, PROMPTS, params, drop_finished=drop))
    answers, reasons = _rows(steps)
    assert reasons[1] == "error" and answers[1] == []
    assert "no token left" in str(steps[0].errors[1]) and steps[0].errors[0] is None
    assert answers[0] == _alone(model, PROMPTS[0], params[0]) and answers[2] == _alone(model, PROMPTS[2], params[2])
    assert reasons[0] == reasons[2] == "length"
