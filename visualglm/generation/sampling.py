"""Choosing the next token from logits: Hugging Face ``generate()`` sampling semantics as pure tensor functions.

Every function takes logits ``[B, vocab]`` and treats each batch row independently. None of them modifies
its input; a function whose step is a no-op (penalty 1.0, temperature 1.0, top-k 0 or >= vocab, top-p 1.0,
no banned range, no invalid row) may return the input tensor itself rather than a copy.

Order (transformers 4.30 ``GenerationMixin``, ``src/transformers/generation/utils.py``):
``_get_logits_processor`` builds the default processors first (``RepetitionPenaltyLogitsProcessor`` among
them) and then ``_merge_criteria_processor_list`` appends the caller's ``logits_processor`` list, which in
the ChatGLM-6B / VisualGLM / GLM-4V ``chat()`` ends with ``InvalidScoreLogitsProcessor``. For sampling,
``_get_logits_warper`` then adds ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``,
and ``sample()`` runs ``logits_processor`` then ``logits_warper``, softmax, ``torch.multinomial``. Greedy
search runs the processors only, then argmax. :func:`process_logits` reproduces exactly that:

    repetition penalty -> invalid-score guard -> banned ranges -> [sampling only: temperature -> top-k -> top-p]

Banned ranges (VisualGLM English mode, reference-spec D17) come after the guard on purpose: they write
``-inf``, and an inf-checking guard placed after them would fire on every step and force its token (the
same would happen in the reference to any ``-inf``-writing processor, e.g. ``MinLengthLogitsProcessor``,
running before ChatGLM-6B's guard; VisualGLM's HF variant, used with ``min_length=100``, checks NaN only,
reference-spec D6).

Note: the reference never passes ``top_k`` to ``generate()``, so HF's implicit default ``top_k=50``
(``PretrainedConfig``/``GenerationConfig``) applies on top of top-p; the reference presets below include it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from visualglm.config import ChatGLMConfig, GLM4VConfig, VisualGLMConfig
from visualglm.families import family_spec
from visualglm.families.chatglm import CHATGLM_FORCED_ID
from visualglm.families.glm4v import GLM4_FORCED_ID as GLM4V_FORCED_ID

INVALID_SCORE_VALUE = 5e4
"""The score the invalid-score guard gives the forced token (``scores[..., forced_id] = 5e4``)."""
CHATGLM6B_FORCED_ID = CHATGLM_FORCED_ID
"""ChatGLM-6B / VisualGLM-6B ``InvalidScoreLogitsProcessor`` forced id."""
GLM4_FORCED_ID = GLM4V_FORCED_ID
"""GLM-4V-9B ``InvalidScoreLogitsProcessor`` forced id."""
HF_DEFAULT_TOP_K = 50
"""``top_k`` that HF ``generate()`` uses when neither the call nor the config sets it."""
VISUALGLM_ENGLISH_BANNED_RANGES: tuple[tuple[int, int], ...] = family_spec(VisualGLMConfig.family).english_banned_ranges
"""``--english`` in VisualGLM's cli_demo: ``invalid_slices=[slice(63823, 130000)]`` (mostly CJK pieces)."""


_NEG_INF = float("-inf")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")  # not NaN, not +-inf


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")


def invalid_score_guard(logits: torch.Tensor, forced_id: int, *, nan_only: bool = False) -> torch.Tensor:
    """Rows holding any NaN or +-inf (NaN only with ``nan_only``) become all zeros with ``forced_id`` = 5e4.

    The reference ``InvalidScoreLogitsProcessor`` tests the whole ``[B, vocab]`` tensor and, if anything is
    bad, zeroes every row. We test and replace per row instead: one bad row must not change what the other
    rows of the batch generate (a batch of one behaves exactly like the reference). ``nan_only`` gives
    VisualGLM's HF variant, which checks ``isnan`` only. Sync-free (no ``.item()``): one pass to test, one
    ``where`` to select.
    """
    _check_logits(logits)
    vocab = logits.shape[-1]
    if not 0 <= forced_id < vocab:
        raise ValueError(f"forced_id {forced_id} is outside the vocabulary [0, {vocab})")
    bad = torch.isnan(logits) if nan_only else ~torch.isfinite(logits)
    bad_rows = bad.any(dim=-1, keepdim=True)
    replacement = logits.new_zeros(vocab)
    replacement[forced_id] = INVALID_SCORE_VALUE
    return torch.where(bad_rows, replacement, logits)


def apply_repetition_penalty(
    logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    penalty: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor``: every id present in a row's ``token_ids`` (prompt + generated)
    gets ``score * penalty`` if its score is negative, else ``score / penalty``; an id seen several times is
    penalised once.

    ``token_ids`` is ``[B, T]``; ``valid`` (bool ``[B, T]``, optional) marks the real tokens. Positions where
    ``valid`` is False (left padding) are ignored and may hold any value, even -1. HF penalises whatever is
    in ``input_ids``, pads included; that quirk is deliberately not copied (a padded row would otherwise
    sample differently from the same prompt unpadded). Ids outside the vocabulary raise ValueError (this
    check costs one host sync).
    """
    _check_logits(logits)
    if penalty <= 0 or not _finite(penalty):
        raise ValueError(f"repetition penalty must be a finite number > 0, got {penalty}")
    if penalty == 1.0 or token_ids is None or token_ids.numel() == 0:
        return logits
    if token_ids.dim() != 2 or token_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"token_ids must be [batch={logits.shape[0]}, T], got shape {tuple(token_ids.shape)}")
    token_ids = token_ids.to(device=logits.device, dtype=torch.long)
    if valid is None:
        weights = torch.ones(token_ids.shape, dtype=logits.dtype, device=logits.device)
    else:
        if valid.shape != token_ids.shape:
            raise ValueError(f"valid must have the shape of token_ids {tuple(token_ids.shape)}, "
                             f"got {tuple(valid.shape)}")
        valid = valid.to(device=logits.device, dtype=torch.bool)
        token_ids = torch.where(valid, token_ids, 0)  # masked positions add 0 to column 0 below
        weights = valid.to(logits.dtype)
    vocab = logits.shape[-1]
    if bool(((token_ids < 0) | (token_ids >= vocab)).any()):
        raise ValueError(f"token_ids hold ids outside the vocabulary [0, {vocab}); mark padding with `valid`")
    # Presence mask by counting (not a scatter of penalised values: duplicate indices with different
    # source values would make the scatter nondeterministic once padding is excluded).
    present = logits.new_zeros(logits.shape).scatter_add_(1, token_ids, weights) > 0
    # A penalty far below 1 can push a positive score past the float range: saturate it at the largest
    # finite value instead of +inf (an inf would turn into NaN in the softmax of top-p or sampling).
    largest = torch.finfo(logits.dtype).max
    penalised = torch.where(logits < 0, logits * penalty, (logits / penalty).clamp(max=largest))
    return torch.where(present, penalised, logits)


def _temperature(logits: torch.Tensor, t: float, inplace: bool) -> torch.Tensor:
    if t <= 0 or not _finite(t):
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    if t == 1.0:
        return logits
    if t > 1.0:  # shrinks every score: nothing can overflow
        return logits.div_(t) if inplace else logits / t
    # Below 1 a plain division can overflow (1e-39 is 0 as a float32 divisor; x / 1e-30 is inf for x >
    # 3.4e8), and inf scores turn into NaN in softmax. Rows where it would are computed with each row's
    # largest finite score subtracted first: every score is then <= 0, the best token(s) get exactly 0 and
    # the rest -inf at worst, the limit of the distribution as t -> 0. Softmax, top-k and top-p do not
    # change under a per-row shift; every other row keeps the reference's exact values. Sync-free.
    divisor = max(t, torch.finfo(logits.dtype).tiny)  # a float32 divisor that is neither 0 nor subnormal
    plain = logits / divisor
    finite = torch.isfinite(logits)
    overflow = (finite & ~torch.isfinite(plain)).any(dim=-1, keepdim=True)
    shift = logits.masked_fill(~finite, _NEG_INF).amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # rows with no finite score
    out = torch.where(overflow, (logits - shift) / divisor, plain)
    return logits.copy_(out) if inplace else out


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """HF ``TemperatureLogitsWarper``: ``logits / t``. A row that this would overflow (tiny ``t``) gets
    ``(logits - row max) / t`` instead, which gives the same softmax, top-k and top-p."""
    _check_logits(logits)
    return _temperature(logits, t, inplace=False)


def _top_k(logits: torch.Tensor, k: int, min_tokens_to_keep: int, inplace: bool) -> torch.Tensor:
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {k}")
    if k == 0:
        return logits
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    if k == logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    remove = logits < kth
    return logits.masked_fill_(remove, _NEG_INF) if inplace else logits.masked_fill(remove, _NEG_INF)


def apply_top_k(logits: torch.Tensor, k: int, *, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """HF ``TopKLogitsWarper``: keep the ``k`` largest scores per row (ties with the k-th value are all kept),
    the rest become ``-inf``. ``k = 0`` (off) or ``k >= vocab`` is a no-op."""
    _check_logits(logits)
    return _top_k(logits, k, min_tokens_to_keep, inplace=False)


def _top_p(logits: torch.Tensor, p: float, min_tokens_to_keep: int, inplace: bool) -> torch.Tensor:
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - p)
    sorted_remove[..., -min_tokens_to_keep:] = False
    remove = sorted_remove.scatter(1, sorted_idx, sorted_remove)
    return logits.masked_fill_(remove, _NEG_INF) if inplace else logits.masked_fill(remove, _NEG_INF)


def _top_p_finite(logits: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
    """:func:`_top_p` computed on the finite entries only (``min_tokens_to_keep=1``): same kept set.

    ``-inf`` entries have probability 0, so in HF's ascending order they come first with cumulative
    probability 0 <= 1 - p and are "removed" (they already are); dropping them from the sort changes
    nothing else. After top-k only ~k entries per row are finite, so a ``topk`` of that many replaces a
    full-vocabulary sort (the one host sync, for the count, is the price).
    """
    if p == 1.0:
        return logits
    count = int(torch.isfinite(logits).sum(dim=-1).max())
    if count == 0:
        return logits
    values, idx = torch.topk(logits, count, dim=-1)  # every finite entry of every row, descending
    ascending, idx = values.flip(-1), idx.flip(-1)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    remove[..., -1:] = False
    new_values = ascending.masked_fill(remove, _NEG_INF)
    return logits.scatter_(1, idx, new_values) if inplace else logits.scatter(1, idx, new_values)


def apply_top_p(logits: torch.Tensor, p: float, *, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """HF ``TopPLogitsWarper``: sort each row ascending, take the cumulative softmax and drop (``-inf``) the
    tokens whose cumulative probability is ``<= 1 - p``; the ``min_tokens_to_keep`` most likely tokens always
    stay. ``p = 1.0`` is a no-op. (Tokens tied at the cut are split in ``torch.sort`` order, as in HF.)"""
    _check_logits(logits)
    return _top_p(logits, p, min_tokens_to_keep, inplace=False)


def _ban(logits: torch.Tensor, ranges: tuple[tuple[int, int], ...] | list, inplace: bool) -> torch.Tensor:
    for start, end in ranges:
        if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end <= start:
            raise ValueError(f"a banned range must be integers 0 <= start < end, got ({start!r}, {end!r})")
    if not ranges:
        return logits
    out = logits if inplace else logits.clone()
    for start, end in ranges:
        out[:, start:end] = _NEG_INF  # an end past the vocabulary is clipped, like a Python slice
    return out


def ban_token_ranges(logits: torch.Tensor, ranges: tuple[tuple[int, int], ...] | list) -> torch.Tensor:
    """Set the ids in each half-open range ``[start, end)`` to ``-inf`` in every row (sat ``invalid_slices``)."""
    _check_logits(logits)
    return _ban(logits, ranges, inplace=False)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are neutral: plain multinomial sampling, nothing filtered.

    ``top_k`` 0 = off; ``repetition_penalty`` 1.0 = off; ``do_sample`` False = greedy (argmax; temperature,
    top-k and top-p are then not applied, the repetition penalty, guard and bans are); ``seed`` is for the
    caller's :func:`make_generator`; ``banned_ranges`` are ``[start, end)`` id ranges set to ``-inf``;
    ``invalid_score_forced_id`` None disables the invalid-score guard; ``invalid_score_nan_only`` selects
    VisualGLM's NaN-only variant of it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int | None = None
    banned_ranges: tuple[tuple[int, int], ...] = ()
    invalid_score_forced_id: int | None = None
    invalid_score_nan_only: bool = False

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first bad field; returns ``self`` so calls can be chained."""

        def is_number(x: Any) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and _finite(x)

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_number(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} "
                             "(use do_sample=False for greedy decoding)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), "
                             f"got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        for r in self.banned_ranges:
            if (not isinstance(r, tuple | list) or len(r) != 2 or not all(is_int(v) for v in r)
                    or r[0] < 0 or r[1] <= r[0]):
                raise ValueError(f"banned_ranges must hold (start, end) integer pairs with 0 <= start < end, "
                                 f"got {r!r}")
        if self.invalid_score_forced_id is not None and (
                not is_int(self.invalid_score_forced_id) or self.invalid_score_forced_id < 0):
            raise ValueError(f"invalid_score_forced_id must be None or a token id >= 0, "
                             f"got {self.invalid_score_forced_id!r}")
        if not isinstance(self.invalid_score_nan_only, bool):
            raise ValueError(f"invalid_score_nan_only must be True or False, got {self.invalid_score_nan_only!r}")
        return self

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_family(cls, family: Any, **overrides: Any) -> SamplingParams:
        """The sampling of ``family``'s reference chat function (a name, config or model; see
        ``FamilySpec.sampling``), with ``overrides``."""
        return cls(**family_spec(family).sampling).replace(**overrides)

    @classmethod
    def chatglm6b(cls, **overrides: Any) -> SamplingParams:
        """ChatGLM-6B HF ``chat``/``stream_chat``: do_sample, top_p 0.7, temperature 0.95, HF's implicit
        top_k 50, InvalidScoreLogitsProcessor forcing id 5 (reference-spec A7)."""
        return cls.for_family(ChatGLMConfig.family, **overrides)

    @classmethod
    def visualglm(cls, **overrides: Any) -> SamplingParams:
        """VisualGLM-6B HF ``chat``: top_p 0.4, top_k 100, temperature 0.8, repetition_penalty 1.2, NaN-only
        guard forcing id 5 (reference-spec B7). ``english=True`` is not a field: pass
        ``banned_ranges=VISUALGLM_ENGLISH_BANNED_RANGES``. (sat's BaseStrategy is a different code path.)"""
        return cls.for_family(VisualGLMConfig.family, **overrides)

    @classmethod
    def glm4v(cls, **overrides: Any) -> SamplingParams:
        """GLM-4V-9B HF ``chat``/``stream_chat``: do_sample, top_p 0.8, temperature 0.8, HF's implicit top_k 50,
        guard forcing id 198 (reference-spec C7)."""
        return cls.for_family(GLM4VConfig.family, **overrides)

    @classmethod
    def glm4v_demo(cls, **overrides: Any) -> SamplingParams:
        """GLM-4 repo ``trans_cli_vision_demo.py``: top_p 0.8, temperature 0.6, repetition_penalty 1.2
        (reference-spec C7), with ``chat``'s guard (id 198) and HF's implicit top_k 50."""
        return cls.glm4v(temperature=0.6, repetition_penalty=1.2).replace(**overrides)


def process_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    params: SamplingParams,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """All of ``params``' processing in the reference order (see the module docstring); returns float32
    scores ready for softmax/argmax. Validates ``params``. ``logits`` is never modified: the first step that
    changes anything makes the copy, later steps work on that copy in place."""
    _check_logits(logits)
    params.validate()
    # The reference processes fp16 logits in fp16; we always work in float32.
    scores = logits.float()
    owned = scores is not logits

    def track(new: torch.Tensor) -> torch.Tensor:
        nonlocal owned
        owned = owned or new is not scores
        return new

    scores = track(apply_repetition_penalty(scores, token_ids, params.repetition_penalty, valid))
    if params.invalid_score_forced_id is not None:
        scores = track(invalid_score_guard(scores, params.invalid_score_forced_id,
                                           nan_only=params.invalid_score_nan_only))
    scores = track(_ban(scores, params.banned_ranges, inplace=owned))
    if params.do_sample:
        scores = track(_temperature(scores, params.temperature, inplace=owned))
        scores = track(_top_k(scores, params.top_k, 1, inplace=owned))
        if 0 < params.top_k < scores.shape[-1]:
            scores = track(_top_p_finite(scores, params.top_p, inplace=owned))
        else:
            scores = track(_top_p(scores, params.top_p, 1, inplace=owned))
    return scores


def next_tokens(
    logits: torch.Tensor,
    token_ids: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row, ``LongTensor[B]``: :func:`process_logits`, then argmax (greedy) or
    ``torch.multinomial(softmax(scores), 1, generator=generator)``. ``generator`` must live on the logits'
    device (see :func:`make_generator`); greedy decoding does not use it. A sequence of B generators draws
    each row from its own (rows of requests with their own seeds, processed as one batch): row i then gets
    the token it would get alone with generator i.

    Scores of ``+inf`` (a model output the invalid-score guard let through) are the limit of a
    distribution: the row picks among its ``+inf`` tokens only. A row that has NaN scores, or no token left
    (everything banned or filtered out), raises :class:`SamplingError` naming the row instead of letting
    argmax or ``torch.multinomial`` pick garbage or fail for the whole batch."""
    scores = _checked(process_logits(logits, token_ids, params, valid))
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[i:i + 1], num_samples=1, generator=g).squeeze(1)
                      for i, g in enumerate(generator)])


class SamplingError(ValueError):
    """A row whose scores cannot be sampled from (NaN, or every token removed)."""


def _checked(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[B, vocab]`` with ``+inf`` rows reduced to their ``+inf`` entries; raises
    :class:`SamplingError` for a row with a NaN or without any score above ``-inf`` (one host sync)."""
    nan_rows = torch.isnan(scores).any(dim=-1)
    empty_rows = (scores == _NEG_INF).all(dim=-1)
    if bool((nan_rows | empty_rows).any()):
        row = int((nan_rows | empty_rows).nonzero()[0, 0])
        problem = "NaN scores (the model's output is not finite)" if bool(nan_rows[row]) else (
            "no token left to choose (every token is banned or filtered out)")
        raise SamplingError(f"row {row}: {problem}")
    top = scores == float("inf")
    inf_rows = top.any(dim=-1, keepdim=True)
    if bool(inf_rows.any()):
        scores = torch.where(inf_rows, torch.where(top, 0.0, _NEG_INF), scores)
    return scores


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; with ``seed=None`` it gets a fresh
    nondeterministic seed (``Generator.seed()``, which leaves torch's global RNG untouched)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
