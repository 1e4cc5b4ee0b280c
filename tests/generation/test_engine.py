"""Generation engine: stopping rules, length limits, batches, compiled decoding."""

from __future__ import annotations

import pytest
import torch

from visualglm.generation.engine import GenerationParams, compile_decode, generate_steps

from ..conftest import random_chatglm

GMASK, SOP = 1001, 1004
PROMPT = [20, 21, 22, 23, GMASK, SOP]


@pytest.fixture(scope="module")
def model():
    return random_chatglm(tie_word_embeddings=False, seed=3)


def _tokens(model, prompts, **params) -> list[list[int]]:
    steps = list(generate_steps(model, prompts, params=GenerationParams(**params)))
    return torch.stack([s.tokens for s in steps], dim=1).tolist()


def test_stop_id_ends_the_row(model) -> None:
    free = _tokens(model, [PROMPT], max_new_tokens=6)[0]
    stop = free[2]
    stopped = _tokens(model, [PROMPT], max_new_tokens=6, stop_ids=(stop,))[0]
    assert stopped == free[: free.index(stop) + 1]


def test_finished_rows_are_padded_while_others_go_on(model) -> None:
    other = [30, 31, GMASK, SOP]
    free = _tokens(model, [PROMPT, other], max_new_tokens=6)
    stop = free[0][1]
    assert stop not in free[1][:5]
    steps = list(generate_steps(model, [PROMPT, other], params=GenerationParams(max_new_tokens=6,
                                                                                stop_ids=(stop,))))
    rows = torch.stack([s.tokens for s in steps], dim=1).tolist()
    cut = free[0].index(stop)
    assert rows[0][: cut + 1] == free[0][: cut + 1]
    assert all(t == model.config.pad_token_id for t in rows[0][cut + 1:])
    assert rows[1] == free[1][: len(rows[1])]
    assert bool(steps[cut].finished[0]) and not bool(steps[cut].finished[1])


def test_max_length_counts_the_prompt(model) -> None:
    assert len(_tokens(model, [PROMPT], max_length=len(PROMPT) + 3)[0]) == 3
    assert len(_tokens(model, [PROMPT], max_length=50, max_new_tokens=2)[0]) == 2


def test_context_bounds_generation(model) -> None:
    short = random_chatglm(tie_word_embeddings=False, max_sequence_length=10)
    assert len(_tokens(short, [PROMPT])[0]) == 10 - len(PROMPT)


def test_length_errors_are_clear(model) -> None:
    with pytest.raises(ValueError, match="context is 2048 tokens"):
        list(generate_steps(model, [[20] * 2046 + [GMASK, SOP]]))
    with pytest.raises(ValueError, match="max_length 6 leaves no room"):
        list(generate_steps(model, [PROMPT], params=GenerationParams(max_length=6)))
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        list(generate_steps(model, [PROMPT], params=GenerationParams(max_new_tokens=0)))
    with pytest.raises(ValueError, match="at least one token"):
        list(generate_steps(model, [[]]))


def test_cache_is_released_unless_kept(model) -> None:
    list(generate_steps(model, [PROMPT], max_new_tokens=2))
    assert model.kv_cache_size() is None
    list(generate_steps(model, [PROMPT], max_new_tokens=2, keep_cache=True))
    assert model.kv_cache_size() == (1, len(PROMPT) + 2)
    model.delete_kv_cache()


@pytest.mark.slow
def test_compiled_decoding_equals_eager(model) -> None:
    eager = _tokens(model, [PROMPT, [30, 31, GMASK, SOP]], max_new_tokens=6)
    compiled = compile_decode(model)
    steps = list(generate_steps(model, [PROMPT, [30, 31, GMASK, SOP]],
                                params=GenerationParams(max_new_tokens=6), compiled=compiled))
    assert torch.stack([s.tokens for s in steps], dim=1).tolist() == eager
