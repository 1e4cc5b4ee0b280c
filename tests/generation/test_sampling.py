"""Sampling against hand-computed cases (every expected value is worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from visualglm.generation.sampling import (
    CHATGLM6B_FORCED_ID,
    GLM4_FORCED_ID,
    VISUALGLM_ENGLISH_BANNED_RANGES,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    ban_token_ranges,
    invalid_score_guard,
    make_generator,
    next_tokens,
    process_logits,
)

INF = float("inf")
NAN = float("nan")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def kept(scores: torch.Tensor) -> list[set[int]]:
    """The ids left finite in each row."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in scores]


def log_probs(*p: float) -> list[float]:
    return [math.log(x) for x in p]


# ----------------------------------------------------------------------------------------- temperature


def test_temperature_divides():
    # [1, 2, -4] / 0.5 = [2, 4, -8]; powers of two, so exact in float32.
    x = t([[1.0, 2.0, -4.0], [0.5, 0.0, 3.0]])
    before = x.clone()
    out = apply_temperature(x, 0.5)
    assert torch.equal(out, t([[2.0, 4.0, -8.0], [1.0, 0.0, 6.0]]))
    assert torch.equal(x, before)
    assert torch.equal(apply_temperature(x, 1.0), x)


@pytest.mark.parametrize("bad", [0.0, -1.0, INF, NAN])
def test_temperature_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(t([[1.0, 2.0]]), bad)


# ----------------------------------------------------------------------------------------------- top-k


def test_top_k_keeps_k_largest_per_row():
    # Row 0 sorted: 3 (id 1), 2 (id 3), 1 (id 0), 0 (id 4), -1 (id 2); k=2 -> kth value 2 -> keep {1, 3}.
    # Row 1 sorted: 9 (id 4), 8 (id 0), 7 (id 2), ... k=2 -> keep {4, 0}.
    x = t([[1.0, 3.0, -1.0, 2.0, 0.0], [8.0, 1.0, 7.0, 2.0, 9.0]])
    before = x.clone()
    out = apply_top_k(x, 2)
    assert kept(out) == [{1, 3}, {0, 4}]
    assert torch.equal(out[0, [1, 3]], t([3.0, 2.0]))
    assert out[0, 0].item() == -INF
    assert torch.equal(x, before)


def test_top_k_keeps_ties_at_kth_value():
    # Sorted: 5, 4, 4, 4, 1; k=2 -> kth value 4 -> everything >= 4 stays: ids {0, 1, 2, 3} (4 tokens).
    out = apply_top_k(t([[5.0, 4.0, 4.0, 4.0, 1.0]]), 2)
    assert kept(out) == [{0, 1, 2, 3}]
    # Sorted: 3, 3, 2, 1, 0; k=1 -> kth value 3 -> both 3s stay.
    assert kept(apply_top_k(t([[3.0, 0.0, 3.0, 2.0, 1.0]]), 1)) == [{0, 2}]


def test_top_k_noop_cases():
    x = t([[1.0, 2.0, 3.0]])
    assert torch.equal(apply_top_k(x, 0), x)  # 0 = off
    assert torch.equal(apply_top_k(x, 3), x)  # k == vocab
    assert torch.equal(apply_top_k(x, 100), x)  # k > vocab
    with pytest.raises(ValueError, match="top_k"):
        apply_top_k(x, -1)


# ----------------------------------------------------------------------------------------------- top-p


def test_top_p_keeps_nucleus():
    # probs 0.1, 0.2, 0.3, 0.4 (already ascending). Cumulative ascending: 0.1, 0.3, 0.6, 1.0.
    # p=0.65 -> remove cumulative <= 0.35 -> ids 0 (0.1), 1 (0.3) removed -> keep {2, 3}.
    # p=0.75 -> remove cumulative <= 0.25 -> only id 0 removed -> keep {1, 2, 3}.
    # p=0.01 -> remove <= 0.99 -> ids 0, 1, 2 removed -> keep {3}.
    x = t([log_probs(0.1, 0.2, 0.3, 0.4)])
    assert kept(apply_top_p(x, 0.65)) == [{2, 3}]
    assert kept(apply_top_p(x, 0.75)) == [{1, 2, 3}]
    assert kept(apply_top_p(x, 0.01)) == [{3}]
    # Softmax is shift invariant and the order of ids does not matter: same nucleus after +7 and a shuffle.
    shuffled = t([[math.log(0.3) + 7, math.log(0.1) + 7, math.log(0.4) + 7, math.log(0.2) + 7]])
    assert kept(apply_top_p(shuffled, 0.65)) == [{0, 2}]


def test_top_p_boundary_cumulative_equal_to_threshold_is_removed():
    # Four equal logits -> probs exactly 0.25 each; cumulative 0.25, 0.5, 0.75, 1.0 (exact in float32).
    # p=0.5: 1-p = 0.5 exactly; "<= 0.5" removes two tokens -> exactly 2 kept (3 if it were "<").
    # p=0.75: 1-p = 0.25 exactly -> exactly 1 removed -> 3 kept.
    x = torch.zeros(1, 4)
    assert len(kept(apply_top_p(x, 0.5))[0]) == 2
    assert len(kept(apply_top_p(x, 0.75))[0]) == 3


def test_top_p_with_already_filtered_tokens_and_rows_independent():
    # Row 0: [0, 0, -inf, -inf] -> probs 0.5, 0.5, 0, 0; ascending cumulative 0, 0, 0.5, 1.0.
    # p=0.5 -> remove <= 0.5 -> both -inf and one of the 0s -> exactly 1 finite token, id 0 or 1.
    # Row 1: probs 0.4, 0.3, 0.2, 0.1 -> ascending cumulative 0.1, 0.3, 0.6, 1.0 -> remove <= 0.5 -> keep {0, 1}.
    x = t([[0.0, 0.0, -INF, -INF], log_probs(0.4, 0.3, 0.2, 0.1)])
    rows = kept(apply_top_p(x, 0.5))
    assert len(rows[0]) == 1 and rows[0] <= {0, 1}
    assert rows[1] == {0, 1}


def test_top_p_noop_and_errors():
    x = t([[1.0, 2.0, 3.0]])
    before = x.clone()
    assert torch.equal(apply_top_p(x, 1.0), x)
    apply_top_p(x, 0.5)
    assert torch.equal(x, before)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            apply_top_p(x, bad)


# ------------------------------------------------------------------------------------ repetition penalty


def test_repetition_penalty_sign_rule_and_duplicates_once():
    # ids present: 0, 1 (twice), 3.  penalty 2:
    #   id 0: 2.0 >= 0 -> 2.0 / 2 = 1.0
    #   id 1: -1.0 < 0 -> -1.0 * 2 = -2.0 (once, not -4.0)
    #   id 2: not present -> 0.5
    #   id 3: -3.0 -> -6.0
    #   id 4: not present -> 4.0
    x = t([[2.0, -1.0, 0.5, -3.0, 4.0]])
    before = x.clone()
    out = apply_repetition_penalty(x, torch.tensor([[0, 1, 1, 3]]), 2.0)
    assert torch.equal(out, t([[1.0, -2.0, 0.5, -6.0, 4.0]]))
    assert torch.equal(x, before)


def test_repetition_penalty_zero_score_and_penalty_below_one():
    # Score exactly 0 is not < 0 -> 0 / p = 0. Penalty 0.5 (an encouragement): 2.0 / 0.5 = 4.0,
    # -1.0 * 0.5 = -0.5.
    x = t([[0.0, 2.0, -1.0]])
    out = apply_repetition_penalty(x, torch.tensor([[0, 1, 2]]), 0.5)
    assert torch.equal(out, t([[0.0, 4.0, -0.5]]))


def test_repetition_penalty_rows_independent_and_pads_ignored():
    # Row 0 tokens: [pad(-1), pad(-1), 2, 2]; only id 2 is real -> 4.0 / 2 = 2.0.
    # Row 1 tokens: [4 (pad, masked), 0, 1, 4 (real)] -> ids 0, 1, 4 penalised:
    #   1.0 -> 0.5, -2.0 -> -4.0, 8.0 -> 4.0; id 2, 3 untouched.
    # A masked pad whose id also occurs for real (row 1, id 4) is still penalised exactly once.
    x = t([[1.0, 1.0, 4.0, 1.0, 1.0], [1.0, -2.0, 3.0, 3.0, 8.0]])
    ids = torch.tensor([[-1, -1, 2, 2], [4, 0, 1, 4]])
    valid = torch.tensor([[False, False, True, True], [False, True, True, True]])
    out = apply_repetition_penalty(x, ids, 2.0, valid)
    assert torch.equal(out, t([[1.0, 1.0, 2.0, 1.0, 1.0], [0.5, -4.0, 3.0, 3.0, 4.0]]))
    # Row 1 with its pad id 3 masked: id 3 is not penalised.
    out = apply_repetition_penalty(x[1:], torch.tensor([[3, 3, 0]]), 2.0, torch.tensor([[False, False, True]]))
    assert torch.equal(out, t([[0.5, -2.0, 3.0, 3.0, 8.0]]))


def test_repetition_penalty_noop_and_errors():
    x = t([[1.0, -1.0]])
    assert torch.equal(apply_repetition_penalty(x, torch.tensor([[0, 1]]), 1.0), x)
    assert torch.equal(apply_repetition_penalty(x, None, 2.0), x)
    assert torch.equal(apply_repetition_penalty(x, torch.zeros(1, 0, dtype=torch.long), 2.0), x)
    with pytest.raises(ValueError, match="penalty"):
        apply_repetition_penalty(x, torch.tensor([[0]]), 0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_repetition_penalty(x, torch.tensor([[-1]]), 2.0)  # unmasked pad
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_repetition_penalty(x, torch.tensor([[2]]), 2.0)


# ---------------------------------------------------------------------------------------- invalid guard


def test_invalid_guard_only_touches_bad_rows():
    # Row 0 has a NaN, row 2 a +inf, row 3 a -inf -> each becomes zeros with id 5 = 5e4. Row 1 is finite.
    x = t([
        [1.0, NAN, 2.0, 3.0, 4.0, 5.0, 6.0],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        [INF, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        [1.0, 2.0, 3.0, -INF, 5.0, 6.0, 7.0],
    ])
    before = x.clone()
    out = invalid_score_guard(x, 5)
    forced = t([[0.0, 0.0, 0.0, 0.0, 0.0, 5e4, 0.0]])
    assert torch.equal(out[0:1], forced)
    assert torch.equal(out[1], before[1])
    assert torch.equal(out[2:3], forced)
    assert torch.equal(out[3:4], forced)
    assert torch.equal(torch.isnan(x), torch.isnan(before))  # input untouched
    assert torch.equal(x[1:], before[1:])


def test_invalid_guard_nan_only_variant():
    # VisualGLM's variant: -inf is not "invalid", NaN is.
    x = t([[1.0, -INF, 2.0, 3.0, 4.0, 5.0], [NAN, 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = invalid_score_guard(x, 5, nan_only=True)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], t([0.0, 0.0, 0.0, 0.0, 0.0, 5e4]))
    with pytest.raises(ValueError, match="forced_id"):
        invalid_score_guard(x, 6)


# ------------------------------------------------------------------------------------------ banned ranges


def test_ban_token_ranges():
    # [1, 3) and [5, 6) on a vocab of 6 -> ids 1, 2, 5 become -inf; an end past the vocab is clipped.
    x = t([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    before = x.clone()
    out = ban_token_ranges(x, [(1, 3), (5, 6)])
    assert kept(out) == [{0, 3, 4}, {0, 3, 4}]
    assert torch.equal(out[:, [0, 3, 4]], before[:, [0, 3, 4]])
    assert torch.equal(x, before)
    assert kept(ban_token_ranges(x, ((4, 100),))) == [{0, 1, 2, 3}] * 2
    assert torch.equal(ban_token_ranges(x, ()), x)
    for bad in [(3, 3), (4, 2), (-1, 2)]:
        with pytest.raises(ValueError, match="banned range"):
            ban_token_ranges(x, [bad])
    assert VISUALGLM_ENGLISH_BANNED_RANGES == ((63823, 130000),)


# -------------------------------------------------------------------------------------- processor order


def test_order_top_k_before_top_p():
    # probs 0.1, 0.2, 0.3, 0.4; top_k 3 then top_p 0.72 (HF order):
    #   top-k keeps 0.2, 0.3, 0.4 -> renormalised 2/9, 3/9, 4/9; cumulative 0.222, 0.556, 1.0;
    #   remove <= 0.28 -> id 1 goes -> keep {2, 3}.
    # (top-p first would give: cumulative 0.1, 0.3, 0.6, 1.0 -> remove <= 0.28 -> keep {1, 2, 3}.)
    params = SamplingParams(top_k=3, top_p=0.72)
    assert kept(process_logits(t([log_probs(0.1, 0.2, 0.3, 0.4)]), None, params)) == [{2, 3}]


def test_order_temperature_before_top_p():
    # probs 0.1, 0.2, 0.3, 0.4 at temperature 0.5 -> p^2 / sum = 0.01, 0.04, 0.09, 0.16 over 0.30
    #   = 0.033, 0.133, 0.3, 0.533; cumulative 0.033, 0.167, 0.467, 1.0; top_p 0.72 removes <= 0.28 -> {2, 3}.
    # (top-p before temperature would keep {1, 2, 3}, see above.)
    params = SamplingParams(temperature=0.5, top_p=0.72)
    out = process_logits(t([log_probs(0.1, 0.2, 0.3, 0.4)]), None, params)
    assert kept(out) == [{2, 3}]
    # surviving scores are the logits divided by 0.5
    assert torch.allclose(out[0, 2:], t([2 * math.log(0.3), 2 * math.log(0.4)]))


def test_order_guard_after_penalty_before_temperature():
    # Row 0 (NaN): guard -> zeros + 5e4 at id 5, then temperature 0.5 -> 1e5 at id 5 (5e4 if temperature
    # came first). Row 1: penalty 2 on id 0: 4.0 -> 2.0, then / 0.5 -> 4.0; others 1.0 / 0.5 = 2.0.
    x = t([[1.0, NAN, 1.0, 1.0, 1.0, 1.0], [4.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(temperature=0.5, repetition_penalty=2.0, invalid_score_forced_id=5)
    out = process_logits(x, torch.tensor([[0], [0]]), params)
    assert torch.equal(out, t([[0.0, 0.0, 0.0, 0.0, 0.0, 1e5], [4.0, 2.0, 2.0, 2.0, 2.0, 2.0]]))


def test_banned_ranges_do_not_trigger_the_guard():
    # The ban writes -inf after the guard ran, so a finite row stays itself (minus the banned ids).
    x = t([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    params = SamplingParams(do_sample=False, banned_ranges=((3, 6),), invalid_score_forced_id=0)
    out = process_logits(x, None, params)
    assert torch.equal(out, t([[1.0, 2.0, 3.0, -INF, -INF, -INF]]))
    assert next_tokens(x, None, params, None).tolist() == [2]


def test_process_logits_does_not_modify_input():
    x = t([[1.0, -2.0, NAN, 0.5], [0.1, 0.2, 0.3, 0.4]])
    before = x.clone()
    params = SamplingParams(temperature=0.7, top_k=2, top_p=0.9, repetition_penalty=1.3,
                            banned_ranges=((0, 1),), invalid_score_forced_id=3)
    process_logits(x, torch.tensor([[1], [2]]), params)
    assert torch.equal(x.nan_to_num(), before.nan_to_num()) and torch.equal(torch.isnan(x), torch.isnan(before))


def test_half_logits_are_processed_in_float32():
    out = process_logits(torch.tensor([[1.0, 2.0]], dtype=torch.float16), None, SamplingParams(temperature=0.5))
    assert out.dtype == torch.float32 and torch.equal(out, t([[2.0, 4.0]]))


# ---------------------------------------------------------------------------------------- next_tokens


def test_greedy_ignores_warpers():
    # Greedy: no temperature/top-k/top-p, so the scores are the logits themselves and the argmax is id 1.
    x = t([[1.0, 3.0, 2.0]])
    params = SamplingParams(do_sample=False, temperature=0.0, top_p=0.1, top_k=1)
    assert torch.equal(process_logits(x, None, params), x)
    assert next_tokens(x, None, params, None).tolist() == [1]


def test_greedy_applies_repetition_penalty():
    # penalty 2 on id 0: 4.0 -> 2.0 < 3.0 -> argmax moves from id 0 to id 1.
    x = t([[4.0, 3.0, 1.0], [4.0, 3.0, 1.0]])
    params = SamplingParams(do_sample=False, repetition_penalty=2.0)
    ids = torch.tensor([[0], [2]])
    assert next_tokens(x, ids, params, None).tolist() == [1, 0]


def test_sampling_never_picks_filtered_tokens():
    # 4000 identical rows (each row draws once): temperature 0.5 + top_p 0.72 leaves ids {2, 3} (see the
    # order test) with probabilities 0.09/0.25 = 0.36 and 0.16/0.25 = 0.64, so both must show up.
    x = t([log_probs(0.1, 0.2, 0.3, 0.4)]).expand(4000, 4)
    params = SamplingParams(temperature=0.5, top_p=0.72)
    drawn = next_tokens(x, None, params, make_generator(0))
    assert drawn.shape == (4000,) and drawn.dtype == torch.long
    assert set(drawn.tolist()) == {2, 3}
    # top-k 1 behaves like greedy under sampling.
    assert set(next_tokens(x, None, SamplingParams(top_k=1), make_generator(1)).tolist()) == {3}
    # banned ranges hold under sampling too: ban ids 2..3 -> only {0, 1}.
    banned = next_tokens(x, None, SamplingParams(banned_ranges=((2, 4),)), make_generator(2))
    assert set(banned.tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible():
    # Uniform logits over 6 ids, 64 rows: two generators with seed 123 draw the same ids; seed 124 differs
    # (the chance of 64 identical independent uniform draws is 6**-64).
    x = torch.zeros(64, 6)
    params = SamplingParams(seed=123)
    a = next_tokens(x, None, params, make_generator(123))
    b = next_tokens(x, None, params, make_generator(123))
    c = next_tokens(x, None, params, make_generator(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert isinstance(make_generator(None), torch.Generator)
    # Two generators seeded nondeterministically almost surely differ too.
    assert not torch.equal(next_tokens(x, None, params, make_generator(None)),
                           next_tokens(x, None, params, make_generator(None)))


# ----------------------------------------------------------------------------------------- parameters


def test_reference_presets():
    chatglm = SamplingParams.chatglm6b().validate()
    assert (chatglm.do_sample, chatglm.top_p, chatglm.temperature, chatglm.top_k) == (True, 0.7, 0.95, 50)
    assert chatglm.invalid_score_forced_id == CHATGLM6B_FORCED_ID == 5
    glm4v = SamplingParams.glm4v().validate()
    assert (glm4v.do_sample, glm4v.top_p, glm4v.temperature, glm4v.repetition_penalty) == (True, 0.8, 0.8, 1.0)
    assert glm4v.invalid_score_forced_id == GLM4_FORCED_ID == 198
    demo = SamplingParams.glm4v_demo().validate()
    assert (demo.top_p, demo.temperature, demo.repetition_penalty) == (0.8, 0.6, 1.2)
    visual = SamplingParams.visualglm().validate()
    assert (visual.top_p, visual.top_k, visual.temperature, visual.repetition_penalty) == (0.4, 100, 0.8, 1.2)
    assert visual.invalid_score_nan_only
    assert SamplingParams.chatglm6b(top_p=0.5).top_p == 0.5
    assert SamplingParams().validate() == SamplingParams()  # neutral defaults are valid


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": NAN}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": NAN}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.2}, "repetition_penalty"),
        ({"repetition_penalty": INF}, "repetition_penalty"),
        ({"do_sample": 1}, "do_sample"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"banned_ranges": ((5, 5),)}, "banned_ranges"),
        ({"banned_ranges": ((-1, 5),)}, "banned_ranges"),
        ({"banned_ranges": ((1, 2, 3),)}, "banned_ranges"),
        ({"invalid_score_forced_id": -5}, "invalid_score_forced_id"),
    ],
)
def test_validation_errors(changes, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**changes).validate()
    with pytest.raises(ValueError, match=field):  # next_tokens validates too
        next_tokens(torch.zeros(1, 4), None, SamplingParams(**changes), make_generator(0))


def test_greedy_allows_zero_temperature():
    SamplingParams(do_sample=False, temperature=0.0).validate()


def test_bad_shapes():
    with pytest.raises(ValueError, match="batch, vocab"):
        next_tokens(torch.zeros(4), None, SamplingParams(), None)
    with pytest.raises(ValueError, match="token_ids"):
        apply_repetition_penalty(torch.zeros(2, 4), torch.zeros(3, 1, dtype=torch.long), 1.2)
    with pytest.raises(ValueError, match="valid"):
        apply_repetition_penalty(torch.zeros(1, 4), torch.zeros(1, 2, dtype=torch.long), 1.2,
                                 torch.ones(1, 3, dtype=torch.bool))


def test_top_p_after_top_k_counts_tied_tokens():
    # probs 0.4, 0.2, 0.2, 0.2; top_k 2 -> kth value is 0.2's logit -> all 4 stay (ties). top_p 0.5 on all
    # four: ascending 0.2, 0.2, 0.2, 0.4, cumulative 0.2, 0.4, 0.6, 1.0, remove <= 0.5 -> two removed ->
    # id 0 plus exactly one of ids 1..3 stay. (Renormalising over only two tokens, 0.667 and 0.333,
    # would wrongly keep id 0 alone.)
    rows = kept(process_logits(t([log_probs(0.4, 0.2, 0.2, 0.2)]), None, SamplingParams(top_k=2, top_p=0.5)))
    assert len(rows[0]) == 2 and 0 in rows[0]


def test_fused_top_k_top_p_matches_the_two_warpers():
    # The top-k + top-p path in process_logits must keep exactly what apply_top_k then apply_top_p keep
    # (random float32 logits have no ties, so the kept sets are unambiguous), with rows holding -inf too.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, generator=gen) * 3
    x[1, :990] = -INF  # fewer finite entries than top_k
    x[2, 500:] = -INF
    for k, p in [(50, 0.7), (5, 0.9), (100, 0.4), (999, 0.95)]:
        fused = process_logits(x, None, SamplingParams(top_k=k, top_p=p))
        reference = apply_top_p(apply_top_k(x, k), p)
        assert torch.equal(fused, reference), (k, p)


# ------------------------------------------------------------------------------ numerical safety at extremes

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from visualglm.generation.sampling import SamplingError  # noqa: E402

TINY = [5e-324, 1e-300, 1e-39, 1e-38, 1e-30, 1e-10, 1e-4]


@settings(max_examples=150, deadline=None)
@given(temperature=st.sampled_from(TINY) | st.floats(1e-4, 100), top_p=st.sampled_from([5e-324, 1e-300, 1.0])
       | st.floats(1e-6, 1.0), top_k=st.integers(0, 70), penalty=st.sampled_from([1e-300, 1e-30, 1e30]) |
       st.floats(1e-3, 100), scale=st.sampled_from([1e-30, 1.0, 1e4, 1e30, 3e38]), seed=st.integers(0, 2**16),
       ban=st.booleans())
def test_every_admissible_setting_samples_a_real_token(temperature, top_p, top_k, penalty, scale, seed, ban):
    # Whatever the settings, sampling picks an id that was neither banned nor -inf, and never raises.
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 64, generator=g) * scale).clamp(-3e38, 3e38)
    logits[:, :3] = -INF
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty,
                            banned_ranges=((50, 64),) if ban else ())
    history = torch.randint(3, 64, (2, 6), generator=g)
    chosen = next_tokens(logits, history, params, make_generator(seed))
    for row, token in enumerate(chosen.tolist()):
        assert 3 <= token < (50 if ban else 64) and bool(torch.isfinite(logits[row, token]))


def test_tiny_temperature_is_the_greedy_limit():
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0], [-7.0, -9.0, -6.5, -8.0]])
    for t in (5e-324, 1e-300, 1e-39, 1e-20):
        probs = torch.softmax(process_logits(logits, None, SamplingParams(temperature=t)), dim=-1)
        assert probs.argmax(dim=-1).tolist() == [1, 2] and bool((probs.max(dim=-1).values == 1).all())


def test_plus_inf_scores_pick_among_the_inf_tokens_and_nan_rows_raise():
    logits = torch.tensor([[0.0, INF, 1.0, INF]])
    params = SamplingParams(temperature=0.7)  # no guard: the VisualGLM guard lets +inf through too
    picks = {int(next_tokens(logits, None, params, make_generator(s))) for s in range(40)}
    assert picks == {1, 3}
    with pytest.raises(SamplingError, match="row 1: NaN"):
        next_tokens(torch.tensor([[0.0, 1.0], [NAN, 0.0]]), None, SamplingParams(do_sample=False), None)
    with pytest.raises(SamplingError, match="no token left"):
        next_tokens(torch.zeros(1, 4), None, SamplingParams(banned_ranges=((0, 4),)), make_generator(0))


def test_a_generator_per_row_draws_each_row_as_alone() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    together = next_tokens(logits, None, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = [int(next_tokens(logits[i:i + 1], None, params, torch.Generator().manual_seed(s))[0])
             for i, s in enumerate((1, 2, 3))]
    assert together.tolist() == alone
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        next_tokens(logits, None, params, [torch.Generator(), torch.Generator()])
