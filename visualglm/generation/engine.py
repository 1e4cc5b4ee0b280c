"""Prefill + decode on the model's static KV cache, yielding one token per row per step.

The engine knows nothing of a model family: the model supplies ``prompt_inputs`` (positions and mask of
left-padded prompts), ``next_position_ids`` (how positions advance while decoding) and its config's
``max_sequence_length``. Every front end (CLI, HTTP API, web UI) reads the same token stream.

:func:`generate_steps` runs a batch under one :class:`GenerationParams` for every row (chat, eval,
benchmarks); :func:`generate_rows` runs it row by row (batches of unrelated requests): each row then has its
own sampling settings, generator, stop ids and length budget, the caller may end rows early, and finished
rows can be dropped from the batch so that they stop costing compute. Both share the padding, cache set-up,
prefill and decode step below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from visualglm.generation.sampling import SamplingParams, make_generator, next_tokens


@dataclass
class GenerationParams:
    """When to stop and how to choose tokens.

    ``max_length`` is the reference's total length (prompt + answer); ``max_new_tokens`` counts answer
    tokens only; the tighter one wins, and the model's context always bounds both.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(do_sample=False))

    def budget(self, prompt_length: int, context: int) -> int:
        """How many tokens may be generated after a prompt of ``prompt_length`` tokens."""
        if prompt_length >= context:
            raise ValueError(f"the prompt has {prompt_length} tokens but the model's context is {context} "
                             "tokens: shorten the prompt or the chat history")
        limits = [context - prompt_length]
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
            limits.append(self.max_new_tokens)
        if self.max_length is not None:
            if self.max_length <= prompt_length:
                raise ValueError(f"max_length {self.max_length} leaves no room to answer a prompt of "
                                 f"{prompt_length} tokens: raise max_length or shorten the prompt/history")
            limits.append(self.max_length - prompt_length)
        return min(limits)


@dataclass
class Step:
    """One decoding step: chosen ``tokens`` ``[B]``, the ``logits`` ``[B, vocab]`` they came from, and
    ``finished`` ``[B]`` (True for rows that emitted a stop id now or earlier; their tokens are padding).

    From :func:`generate_rows`, ``reasons`` says for each row why it is finished: None (still running: its token
    is an answer token), ``"stop"`` (it chose a stop id, now or earlier), ``"length"`` (its own budget is
    spent), ``"ended"`` (the caller ended it) or ``"error"`` (its token could not be chosen, e.g. NaN
    scores: ``errors[row]`` holds the exception; the other rows go on). A row still None when the steps run
    out ended by length. Logits of rows already dropped from the batch are zeros."""

    tokens: torch.Tensor
    logits: torch.Tensor
    finished: torch.Tensor
    reasons: tuple[str | None, ...] | None = None
    errors: tuple[Exception | None, ...] | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Prompts -> ids ``[B, T]`` padded on the left with ``pad_id``, and the pad count of each row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    num_pad = [length - len(p) for p in prompts]
    rows = [[pad_id] * n + list(p) for p, n in zip(prompts, num_pad, strict=True)]
    return torch.tensor(rows, dtype=torch.long), num_pad


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class DecodeState:
    """Per-generation decode inputs kept at fixed shapes: the positions of the next token and a mask
    row over every cache slot (slots not written yet are blocked)."""

    def __init__(self, prompt_mask_row: torch.Tensor, position: torch.Tensor, cache_length: int) -> None:
        batch, _, _, length = prompt_mask_row.shape
        self.mask = torch.zeros(batch, 1, 1, cache_length, dtype=torch.bool, device=prompt_mask_row.device)
        self.mask[..., :length] = prompt_mask_row
        self.position = position
        self.length = length  # slots written so far

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices ``[B']``) of the batch."""
        self.mask = self.mask.index_select(0, rows)
        self.position = self.position.index_select(0, rows)

    def advance(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for one more token: returns its cache slot ``[1]`` and positions ``[B, P, 1]``."""
        self.position = model.next_position_ids(self.position)
        self.mask[..., self.length] = True
        slot = torch.tensor([self.length], device=self.mask.device)
        self.length += 1
        return slot, self.position


@torch.inference_mode()
def generate_steps(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                   pad_id: int | None = None, *,
                   params: GenerationParams | None = None, generator: torch.Generator | None = None,
                   reuse_prefix: int = 0, keep_cache: bool = False, compiled: Callable | None = None,
                   inputs_embeds: torch.Tensor | None = None) -> Iterator[Step]:
    """Generate for a batch of ``B`` prompts under one ``params``; one ``Step`` (tokens ``[B]``, logits
    ``[B, vocab]``, finished ``[B]``) per new token until every row stops or the budget is spent.

    ``params`` gives stop ids, length limits and sampling (default: greedy, no stop ids, which with
    ``max_new_tokens`` reproduces a fixed number of steps); ``max_new_tokens`` overrides its own. The budget
    is the longest (left-padded) prompt's. ``generator`` drives sampling (None: a fresh one from the seed).
    ``reuse_prefix`` > 0 (single prompt only) keeps the cache slots ``[0, reuse_prefix)`` from an earlier
    call with ``keep_cache=True`` that held the same tokens there; the caller vouches that they are valid
    (see ``ChatSession``). ``compiled`` is an optional compiled forward used for decode steps.
    ``inputs_embeds`` ``[B, T, hidden]`` (aligned with the left-padded prompts) replaces the prompt's token
    embeddings in the prefill: this is how images enter (the ids still define positions and masks).
    For one GenerationParams per row see :func:`generate_rows`.
    """
    params = params or GenerationParams()
    if max_new_tokens is not None:
        params = dataclasses.replace(params, max_new_tokens=max_new_tokens)
    pad_id, input_ids, num_pad = _pad_prompts(model, prompts, pad_id)
    context = model.config.max_sequence_length
    batch, length = input_ids.shape
    budget = params.budget(length, context)
    positions, mask = model.prompt_inputs(input_ids, num_pad)
    cache_length = length + budget
    if reuse_prefix and (batch != 1 or not _cache_fits(model, batch, cache_length) or reuse_prefix >= length):
        reuse_prefix = 0
    if not reuse_prefix:
        # Compiled decoding wants one cache shape for the whole session: size it to the context.
        _ensure_cache(model, batch, cache_length, context if compiled is not None else None)
    device = input_ids.device
    logits, state, valid = _prefill(model, input_ids, num_pad, positions, mask, inputs_embeds, start=reuse_prefix)
    sampling = params.sampling.validate()
    generator = generator or make_generator(sampling.seed, device)
    with _cache_scope(model, keep_cache):
        tokens = input_ids
        stop = torch.tensor(list(params.stop_ids) or [-1], device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(budget):
            chosen = next_tokens(logits, tokens, sampling, generator, valid=valid)
            chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
            finished = finished | torch.isin(chosen, stop)
            yield Step(chosen, logits, finished.clone())
            if bool(finished.all()) or step == budget - 1:
                break
            tokens = torch.cat((tokens, chosen[:, None]), dim=1)
            valid = torch.cat((valid, ~finished[:, None]), dim=1)
            if compiled is not None:
                logits = _compiled_decode(model, compiled, chosen, state)
            else:
                logits = _decode(model, chosen, state, padded=any(num_pad))


@torch.inference_mode()
def generate_rows(model: nn.Module, prompts: Sequence[Sequence[int]], params: Sequence[GenerationParams], *,
                  generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
                  pad_id: int | None = None, keep_cache: bool = False, inputs_embeds: torch.Tensor | None = None,
                  end_rows: Callable[[], Sequence[int]] | None = None,
                  drop_finished: bool = False) -> Iterator[Step]:
    """Generate for a batch of ``B`` prompts with one GenerationParams per prompt (``params``, length
    ``B``): the server's batches of unrelated requests. One ``Step`` per new token, always at the full
    batch size (tokens ``[B]``, logits ``[B, vocab]``, finished ``[B]``, and ``reasons``/``errors`` per row).

    Each row has its own sampling settings, stop ids and budget (its own prompt length counts for
    ``max_length``, as if it ran alone); the call runs until the largest budget is spent or every row is
    finished. ``generators`` gives one generator per row (None in a slot, or None for all: a fresh one from
    that row's seed; a lone generator is taken for a single prompt). ``end_rows`` is called after each step
    the caller has read and returns the rows (original indices) to end now (client gone, stop string
    matched); under tensor parallelism every rank must return the same rows. ``drop_finished`` removes
    finished rows from the batch (and from the KV cache) before the next forward, so they stop costing
    compute. ``pad_id``, ``keep_cache`` and ``inputs_embeds`` ``[B, T, hidden]`` as in :func:`generate_steps`.
    """
    if isinstance(params, GenerationParams):
        raise ValueError("generate_rows takes per-row params (one GenerationParams per prompt); "
                         "for one GenerationParams for the whole batch use generate_steps")
    pad_id, input_ids, num_pad = _pad_prompts(model, prompts, pad_id)
    batch, length = input_ids.shape
    if len(params) != batch:
        raise ValueError(f"{len(params)} GenerationParams for {batch} prompts")
    generators = _row_generators(generators, batch)
    # Each row's budget counts its own prompt, as if it ran alone; the batch runs to the largest.
    context = model.config.max_sequence_length
    budgets = [p.budget(len(prompt), context) for p, prompt in zip(params, prompts, strict=True)]
    budget = max(budgets)
    positions, mask = model.prompt_inputs(input_ids, num_pad)
    _ensure_cache(model, batch, length + budget, None)
    device = input_ids.device
    logits, state, valid = _prefill(model, input_ids, num_pad, positions, mask, inputs_embeds)
    rows = _Rows(params, generators, device)
    with _cache_scope(model, keep_cache):
        tokens = input_ids
        active = list(range(batch))  # the original row of each row of the (possibly shrunk) batch tensors
        for _ in range(budget):
            chosen = rows.choose(logits, tokens, valid, active, pad_id)
            out, out_logits = _scatter_rows(chosen, logits, active, batch, pad_id)
            yield Step(out, out_logits, rows.finished(), tuple(rows.reasons), tuple(rows.errors))
            rows.end_spent(active, budgets)
            rows.end(end_rows() if end_rows is not None else ())
            live = [j for j, row in enumerate(active) if rows.reasons[row] is None]
            if not live:
                break
            tokens = torch.cat((tokens, chosen[:, None]), dim=1)
            alive = torch.tensor([rows.reasons[row] is None for row in active], device=device)
            valid = torch.cat((valid, alive[:, None]), dim=1)
            if drop_finished and len(live) < len(active):
                keep = torch.tensor(live, device=device)
                tokens, valid, chosen = tokens[keep], valid[keep], chosen[keep]
                state.select(keep)
                model.select_kv_cache_rows(keep)
                active = [active[j] for j in live]
            # With no left padding left, no mask at all (as a lone request).
            logits = _decode(model, chosen, state, padded=any(num_pad[row] for row in active))


class _Rows:
    """Per-row sampling state of :func:`generate_rows`, indexed by original row: settings, generator,
    stop ids, tokens produced, and why the row finished (None: still running) with its error if any."""

    def __init__(self, params: Sequence[GenerationParams], generators: Sequence[torch.Generator | None],
                 device: torch.device) -> None:
        self.samplings = [p.sampling.validate() for p in params]
        self.generators = [g or make_generator(s.seed, device) for g, s in zip(generators, self.samplings,
                                                                               strict=True)]
        self.stops = [frozenset(p.stop_ids) for p in params]
        self.reasons: list[str | None] = [None] * len(params)
        self.errors: list[Exception | None] = [None] * len(params)
        self.produced = [0] * len(params)
        self.device = device

    def choose(self, logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, active: Sequence[int],
               pad_id: int) -> torch.Tensor:
        """Tokens ``[B']`` for the batch rows ``active`` (logits ``[B', vocab]``, tokens and valid ``[B', T]``);
        finished rows get ``pad_id``."""
        # Each row is sampled alone, with its own settings and generator: a seeded request picks the
        # same tokens whether it is batched or not (up to the float noise of batched matmuls).
        chosen = torch.full((len(active),), pad_id, dtype=torch.long, device=self.device)
        for j, row in enumerate(active):
            if self.reasons[row] is not None:
                continue
            try:
                token = next_tokens(logits[j:j + 1], tokens[j:j + 1], self.samplings[row], self.generators[row],
                                    valid=valid[j:j + 1])
            except Exception as exc:  # confined to this row (NaN scores, ...): it ends, the others go on
                self.reasons[row], self.errors[row] = "error", exc
                continue
            chosen[j] = token[0]
            self.produced[row] += 1
            if int(token[0]) in self.stops[row]:
                self.reasons[row] = "stop"
        return chosen

    def finished(self) -> torch.Tensor:
        """``[B]``: True for every row that has a reason to be finished."""
        return torch.tensor([r is not None for r in self.reasons], device=self.device)

    def end_spent(self, active: Sequence[int], budgets: Sequence[int]) -> None:
        """End with "length" the running rows that produced their whole budget."""
        for row in active:
            if self.reasons[row] is None and self.produced[row] >= budgets[row]:
                self.reasons[row] = "length"

    def end(self, rows: Sequence[int]) -> None:
        """End with "ended" the running rows among ``rows`` (original indices; others are ignored)."""
        for row in rows:
            if 0 <= row < len(self.reasons) and self.reasons[row] is None:
                self.reasons[row] = "ended"


def _row_generators(generators: Sequence[torch.Generator | None] | torch.Generator | None,
                    batch: int) -> list[torch.Generator | None]:
    """One generator (or None) per row; a lone generator only for a batch of one."""
    if isinstance(generators, torch.Generator):
        if batch != 1:
            raise ValueError("per-row params need one generator per row (or none)")
        generators = [generators]
    generators = [None] * batch if generators is None else list(generators)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} prompts")
    return generators


def _scatter_rows(chosen: torch.Tensor, logits: torch.Tensor, active: Sequence[int], batch: int,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk batch's tokens ``[B']`` and logits ``[B', vocab]`` at full size ``[B]``/``[B, vocab]``
    (dropped rows: ``pad_id`` and zeros)."""
    if len(active) == batch:
        return chosen, logits
    index = torch.tensor(active, device=chosen.device)
    out = torch.full((batch,), pad_id, dtype=torch.long, device=chosen.device).index_copy_(0, index, chosen)
    return out, logits.new_zeros(batch, logits.shape[-1]).index_copy_(0, index, logits)


def _pad_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int | None
                 ) -> tuple[int, torch.Tensor, list[int]]:
    """The pad id (default: the config's), the left-padded ids ``[B, T]`` on the model's device, and the
    pad count of each row."""
    pad_id = model.config.pad_token_id if pad_id is None else pad_id
    input_ids, num_pad = left_pad(prompts, pad_id)
    return pad_id, input_ids.to(_model_device(model)), num_pad


def _ensure_cache(model: nn.Module, batch: int, length: int, size: int | None) -> None:
    """Allocate a KV cache of ``batch`` rows and ``size`` slots (None: ``length``) unless a fixed ``size``
    is not asked for and the present cache already holds ``batch`` rows of ``length`` slots."""
    if size is not None or not _cache_fits(model, batch, length):
        model.setup_kv_cache(batch, length if size is None else size)


@contextmanager
def _cache_scope(model: nn.Module, keep_cache: bool) -> Iterator[None]:
    """Delete the model's KV cache when the decode loop ends (finished, failed or abandoned) unless
    ``keep_cache``."""
    try:
        yield
    finally:
        if not keep_cache:
            model.delete_kv_cache()


def _decode(model: nn.Module, chosen: torch.Tensor, state: DecodeState, padded: bool) -> torch.Tensor:
    """One eager decode step for the tokens ``chosen`` ``[B]``: logits ``[B, vocab]`` (fp32). Attends to the
    written slots only; without left padding (``padded`` False) every row sees all of them: no mask."""
    slot, position = state.advance(model)
    row_mask = state.mask[..., :state.length] if padded else None
    return model(chosen[:, None], position, row_mask, cache_positions=slot)[:, -1].float()


def _compiled_decode(model: nn.Module, compiled: Callable, chosen: torch.Tensor, state: DecodeState
                     ) -> torch.Tensor:
    """One decode step through ``compiled`` at fixed shapes (the mask over every cache slot): logits
    ``[B, vocab]`` (fp32)."""
    slot, position = state.advance(model)
    # CUDA graphs reuse their output buffers at the next replay: keep a copy of what is yielded.
    torch.compiler.cudagraph_mark_step_begin()
    return compiled(chosen[:, None], position, state.mask, cache_positions=slot)[:, -1].float().clone()


def _prefill(model: nn.Module, input_ids: torch.Tensor, num_pad: Sequence[int], positions: torch.Tensor,
             mask: torch.Tensor, inputs_embeds: torch.Tensor | None, start: int = 0
             ) -> tuple[torch.Tensor, DecodeState, torch.Tensor]:
    """Run the prompts ``input_ids`` ``[B, T]`` from slot ``start`` on (earlier slots are cached) into the
    allocated cache. Returns the last position's logits ``[B, vocab]`` (fp32), the decode state, and which
    ids are real tokens (not left padding) ``[B, T]``."""
    device = input_ids.device
    length = input_ids.shape[1]
    if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
        raise ValueError(f"inputs_embeds {tuple(inputs_embeds.shape)} do not match the padded prompts "
                         f"{tuple(input_ids.shape)}")
    prompt_embeds = None if inputs_embeds is None else inputs_embeds[:, start:].to(device)
    logits = model(input_ids[:, start:], positions[..., start:], mask[:, :, start:, :],
                   cache_positions=torch.arange(start, length, device=device), inputs_embeds=prompt_embeds,
                   logits_to_keep=1)[:, -1].float()
    state = DecodeState(mask[:, :, -1:, :], positions[..., -1:], _cache_capacity(model))
    valid = torch.tensor([[i >= n for i in range(length)] for n in num_pad], device=device)
    return logits, state, valid


_COMPILED_ATTR = "_visualglm_compiled_decode"
TUNING_ENV = "VISUALGLM_COMPILE_TUNING"


def compile_decode(model: nn.Module, mode: str | None = "auto") -> Callable:
    """``torch.compile`` of the model's forward for decode steps (fixed shapes: one token per row, a mask
    over every cache slot). Pass the result as ``compiled=`` to ``generate_steps`` or ``ContinuousEngine``.

    One compiled step per model: every later call returns the same one (``compiled_decode_for``), so chat
    sessions, the server's engine and batch generation share its compiled graphs. ``mode`` "auto": on CUDA
    ``"reduce-overhead"`` (CUDA graphs, one per shape, i.e. per batch-size bucket) with ``fullgraph=True``,
    as gpt-fast decodes; elsewhere Inductor's default. ``VISUALGLM_COMPILE_TUNING=1`` turns on Inductor's
    coordinate-descent tuning (gpt-fast's setting; slower to compile)."""
    existing = compiled_decode_for(model)
    if existing is not None:
        return existing
    cuda = _model_device(model).type == "cuda"
    if mode == "auto":
        mode = "reduce-overhead" if cuda else None
    if os.environ.get(TUNING_ENV) == "1":  # gpt-fast's setting: matrix-vector products as tuned reductions
        import torch._inductor.config as inductor_config  # (longer compile; fuses INT8 dequantization)

        inductor_config.coordinate_descent_tuning = True
    compiled = torch.compile(model, dynamic=False, fullgraph=cuda, mode=mode)
    model.__dict__[_COMPILED_ATTR] = compiled  # not a submodule: invisible to modules() and state_dict()
    return compiled


def compiled_decode_for(model: nn.Module) -> Callable | None:
    """The compiled decode step made for ``model`` by ``compile_decode``, or None."""
    return model.__dict__.get(_COMPILED_ATTR)


def _cache_capacity(model: nn.Module) -> int:
    size = model.kv_cache_size()
    return 0 if size is None else size[1]


def _cache_fits(model: nn.Module, batch: int, length: int) -> bool:
    size = model.kv_cache_size()
    return size is not None and size[0] == batch and size[1] >= length
