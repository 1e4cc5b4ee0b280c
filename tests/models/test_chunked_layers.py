"""A prefill cut inside its layers (``hidden_state_stages(token_chunk=...)``) is the same computation as one
forward: the same hidden states and the same keys/values in the cache, for ChatGLM-6B's prompts that attend
both ways, for GLM-4's causal ones, and after a reused prefix."""

from __future__ import annotations

import pytest
import torch

import visualglm
from visualglm.models.layers import run_stages

from ..conftest import random_chatglm

GMASK, SOP = 1001, 1004


def _prefill(model, ids: torch.Tensor, start: int, token_chunk: int | None):
    """Prefill ``ids`` [1, T] from slot ``start`` on (slots before it hold the same prompt's first part):
    (final hidden states of the new tokens, the yields, the cache's keys of the first layer)."""
    model.setup_kv_cache(1, 64)
    positions, mask = model.prompt_inputs(ids)
    if start:  # the reused part, computed the plain way
        model.hidden_states(ids[:, :start], positions[..., :start], mask[:, :, :start, :start],
                            cache_positions=torch.arange(start))
    stages = model.hidden_state_stages(ids[:, start:], positions[..., start:], mask[:, :, start:, :],
                                       cache_positions=torch.arange(start, ids.shape[1]), token_chunk=token_chunk)
    yields = []
    while True:
        try:
            yields.append(next(stages))
        except StopIteration as done:
            hidden = done.value
            break
    keys = model.attention_modules()[0].kv_cache.k[:, :, :ids.shape[1]].clone()
    return hidden, yields, keys


def _check(model, ids: torch.Tensor, start: int, chunk: int) -> None:
    whole, whole_yields, whole_keys = _prefill(model, ids, start, None)
    cut, yields, keys = _prefill(model, ids, start, chunk)
    layers = len(model.attention_modules())
    assert whole_yields == list(range(1, layers + 1))
    # Pieces: each layer writes the keys of ceil(new / chunk) pieces, then lets as many attend.
    pieces = -(-(ids.shape[1] - start) // chunk)
    assert len(yields) == 2 * pieces * layers and yields[-1] == layers
    assert all(a < b for a, b in zip(yields, yields[1:], strict=False))
    assert [y for y in yields if y == int(y)] == list(range(1, layers + 1))
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, whole_keys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("start", "chunk"), [(0, 3), (0, 7), (5, 4)])
def test_chatglm_prefill_cut_inside_layers_is_exact(start: int, chunk: int) -> None:
    model = random_chatglm(tie_word_embeddings=False, seed=5)
    ids = torch.tensor([[7 + 13 * i % 800 for i in range(17)] + [GMASK, SOP]])
    _check(model, ids, start, chunk)


def test_chatglm_cut_matches_the_bidirectional_answer_not_a_causal_one() -> None:
    """The context attends both ways: a piece's queries see the keys of later pieces. Were they hidden, the
    first piece's hidden states would change (this guards the test above against a trivially causal mask)."""
    model = random_chatglm(tie_word_embeddings=False, seed=5)
    ids = torch.tensor([[7 + 13 * i % 800 for i in range(17)] + [GMASK, SOP]])
    whole, _, _ = _prefill(model, ids, 0, None)
    model.setup_kv_cache(1, 64)
    positions, mask = model.prompt_inputs(ids)
    first_alone = model.hidden_states(ids[:, :4], positions[..., :4], mask[:, :, :4, :4],
                                      cache_positions=torch.arange(4))
    assert (first_alone - whole[:, :4]).abs().max() > 1e-3


@pytest.mark.parametrize(("start", "chunk"), [(0, 4), (6, 5)])
def test_glm4v_prefill_cut_inside_layers_is_exact(glm4v_checkpoint, start: int, chunk: int) -> None:
    model = visualglm.load(glm4v_checkpoint, progress=False)
    ids = torch.tensor([[5 + 11 * i % 300 for i in range(21)]])
    _check(model, ids, start, chunk)


def test_a_cut_needs_a_cache() -> None:
    model = random_chatglm(tie_word_embeddings=False)
    ids = torch.tensor([[7, 8, 9, 10, GMASK, SOP]])
    with pytest.raises(ValueError, match="token_chunk needs a KV cache"):
        run_stages(model.hidden_state_stages(ids, token_chunk=2))
