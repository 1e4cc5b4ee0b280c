"""ChatGLM-6B decoder: cache/padding invariances, dtypes and the reference's position rules."""

from __future__ import annotations

import json

import pytest
import torch

from visualglm.config import get_config
from visualglm.generation.engine import generate_steps
from visualglm.models.chatglm import ChatGLMForCausalLM, chatglm_prompt_inputs
from visualglm.models.layers import rotary_cos_sin, rotary_inv_freq

from ..conftest import GOLDEN_DIR, random_chatglm

CFG = get_config("chatglm-tiny")
GMASK, SOP, MASK = CFG.gmask_token_id, CFG.bos_token_id, CFG.mask_token_id


def test_prompt_positions_by_hand() -> None:
    ids = torch.tensor([[7, 8, 9, GMASK, SOP]])
    positions, allowed = chatglm_prompt_inputs(ids, CFG)
    assert positions.tolist() == [[[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]]]
    # Everything before <sop> is visible to every row; <sop> only to itself and later rows.
    assert allowed[0, 0].int().tolist() == [[1, 1, 1, 1, 0]] * 4 + [[1, 1, 1, 1, 1]]


def test_mask_token_position_rule() -> None:
    # [MASK] instead of [gMASK]: tokens from <sop> on take the [MASK] index as their position.
    ids = torch.tensor([[7, MASK, 9, SOP, 11]])
    positions, _ = chatglm_prompt_inputs(ids, CFG)
    assert positions.tolist() == [[[0, 1, 2, 1, 1], [0, 0, 0, 1, 2]]]


def test_left_padding_positions_and_mask() -> None:
    ids = torch.tensor([[3, 3, 7, GMASK, SOP]])
    positions, allowed = chatglm_prompt_inputs(ids, CFG, num_pad=[2])
    assert positions.tolist() == [[[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]]
    assert not allowed[0, 0, :2].any() and not allowed[0, 0, :, :2].any()


def test_truncated_prompt_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no <sop>"):
        chatglm_prompt_inputs(torch.tensor([[7, 8, GMASK]]), CFG)
    with pytest.raises(ValueError, match=r"no \[gMASK\] or \[MASK\]"):
        chatglm_prompt_inputs(torch.tensor([[7, 8, SOP]]), CFG)


def test_inv_freq_matches_reference_after_load() -> None:
    cases = GOLDEN_DIR / "chatglm-6b" / "cases.json"
    if not cases.is_file():
        pytest.skip("no golden chatglm-6b folder")
    golden = json.loads(cases.read_text())
    config = json.loads((GOLDEN_DIR / "chatglm-6b" / "config.json").read_text())
    rot_dim = config["hidden_size"] // config["num_attention_heads"] // 2
    assert rotary_inv_freq(rot_dim, round_to_fp16=True).tolist() == golden["rotary_inv_freq_after_load"]


def test_fp16_table_is_computed_in_fp16() -> None:
    # The reference multiplies fp16 positions by fp16 frequencies: at position 2049 the product rounds.
    inv = rotary_inv_freq(64, round_to_fp16=True)
    positions = torch.tensor([2049])
    cos16, _ = rotary_cos_sin(positions, inv, torch.float16)
    by_hand = (positions.half().unsqueeze(-1) * inv.half()).float().cos().half()
    assert torch.equal(cos16[..., :32], by_hand)
    cos32, _ = rotary_cos_sin(positions, inv, torch.float32)
    assert not torch.allclose(cos32[..., :32], by_hand.float(), atol=1e-3)


def _full_forward_logits(model: ChatGLMForCausalLM, prompt: list[int], new: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        return model(ids)[0, len(prompt) - 1:].float()


def test_cached_decoding_equals_full_forward() -> None:
    model = random_chatglm()
    prompt = [20, 21, 22, 23, GMASK, SOP]
    steps = list(generate_steps(model, [prompt], max_new_tokens=6))
    new = [int(s.tokens[0]) for s in steps]
    cached = torch.stack([s.logits[0] for s in steps])
    full = _full_forward_logits(model, prompt, new)[:-1]
    assert (cached - full).abs().max().item() < 1e-4


def test_left_padded_row_equals_unpadded_run() -> None:
    model = random_chatglm()
    short, long = [30, 31, GMASK, SOP], [40, 41, 42, 43, 44, GMASK, SOP]
    batched = list(generate_steps(model, [long, short], max_new_tokens=5))
    alone = list(generate_steps(model, [short], max_new_tokens=5))
    assert [int(s.tokens[1]) for s in batched] == [int(s.tokens[0]) for s in alone]
    diff = max((b.logits[1] - a.logits[0]).abs().max().item() for b, a in zip(batched, alone, strict=True))
    assert diff < 1e-4


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.5), (torch.float16, 0.1)])
def test_half_precision_runs_close_to_fp32(dtype: torch.dtype, tolerance: float) -> None:
    model = random_chatglm()
    ids = torch.tensor([[20, 21, 22, GMASK, SOP]])
    with torch.no_grad():
        reference = model(ids).float()
        low = model.to(dtype)(ids).float()
    assert torch.isfinite(low).all()
    assert (low - reference).abs().max().item() < tolerance


def test_lm_head_is_tied_to_embeddings() -> None:
    model = random_chatglm()
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    untied = random_chatglm(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.word_embeddings.weight


def test_cache_required_for_cache_positions() -> None:
    model = random_chatglm()
    with pytest.raises(RuntimeError, match="setup_kv_cache"):
        model(torch.tensor([[5]]), torch.zeros(1, 2, 1, dtype=torch.long), cache_positions=torch.tensor([0]))


def test_1d_position_encoding_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="position_encoding_2d"):
        random_chatglm(position_encoding_2d=False)
