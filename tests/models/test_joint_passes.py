"""Passes through the blocks that share a block (``layers.advance_passes``: a decode step and a stage of a
prompt's prefill) compute what each computes alone, with the block's linear layers called once for both."""

from __future__ import annotations

import torch

import visualglm
from visualglm.models.layers import advance_passes, flatten_groups, unflatten_groups

from ..conftest import random_chatglm

GMASK, SOP = 1001, 1004


def _inputs(model, first: torch.Tensor, second: torch.Tensor) -> tuple[dict, dict]:
    """Cache row 0 holds ``first`` [1, T]; the arguments of its next decode step (row 0) and of the prefill
    of ``second`` [1, U] into cache row 1."""
    model.setup_kv_cache(2, 64)
    positions, mask = model.prompt_inputs(first)
    length = first.shape[1]
    model.hidden_states(first, positions, mask, cache_positions=torch.arange(length), cache_rows=slice(0, 1))
    decode = dict(input_ids=torch.tensor([[17]]), position_ids=model.next_position_ids(positions[..., -1:]),
                  attention_mask=None, cache_positions=torch.tensor([length]), cache_rows=slice(0, 1))
    positions, mask = model.prompt_inputs(second)
    prefill = dict(input_ids=second, position_ids=positions, attention_mask=mask,
                   cache_positions=torch.arange(second.shape[1]), cache_rows=slice(1, 2))
    return decode, prefill


def _check(model, first: torch.Tensor, second: torch.Tensor) -> None:
    layers = len(model.decoder_blocks())
    decode, prefill = _inputs(model, first, second)
    alone_decode = model.hidden_states(**decode)
    alone_prefill = model.hidden_states(**prefill)
    alone_cache = [a.kv_cache.k.clone() for a in model.attention_modules()]

    decode, prefill = _inputs(model, first, second)
    stop = layers - 1  # this step's stage of the prefill: blocks [0, stop)
    calls = []
    hook = model.attention_modules()[stop - 1].query_key_value.register_forward_hook(lambda *_: calls.append(1))
    try:
        step, stage = model.start_pass(**decode), model.start_pass(**prefill)
        advance_passes(model.decoder_blocks(), [step, stage], [layers, stop])
        assert (step.next, stage.next) == (layers, stop)
        assert len(calls) == 1  # the projection of the stage's last block ran once for both passes
        advance_passes(model.decoder_blocks(), [stage], [layers])
    finally:
        hook.remove()
    torch.testing.assert_close(model.final_norm(step.x), alone_decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.final_norm(stage.x), alone_prefill, rtol=1e-5, atol=1e-5)
    for attention, keys in zip(model.attention_modules(), alone_cache, strict=True):
        torch.testing.assert_close(attention.kv_cache.k, keys, rtol=1e-5, atol=1e-5)


def test_chatglm_decode_and_prefill_passes_share_blocks_exactly() -> None:
    model = random_chatglm(tie_word_embeddings=False, seed=7).eval()
    with torch.inference_mode():
        _check(model, torch.tensor([[7, 8, 9, 10, 11, GMASK, SOP, 40]]),
               torch.tensor([[5 + 13 * i % 700 for i in range(12)] + [GMASK, SOP]]))


def test_glm4v_decode_and_prefill_passes_share_blocks_exactly(glm4v_checkpoint) -> None:
    model = visualglm.load(glm4v_checkpoint, progress=False)
    with torch.inference_mode():
        _check(model, torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[5 + 11 * i % 300 for i in range(15)]]))


def test_flattened_groups_split_back_to_their_shapes() -> None:
    linear = torch.nn.Linear(4, 3)
    xs = [torch.randn(2, 1, 4), torch.randn(1, 5, 4)]
    flat, shapes = flatten_groups(xs)
    assert flat.shape == (7, 4)
    outs = unflatten_groups(linear(flat), shapes)
    assert [o.shape for o in outs] == [(2, 1, 3), (1, 5, 3)]
    for out, x in zip(outs, xs, strict=True):
        torch.testing.assert_close(out, linear(x))
