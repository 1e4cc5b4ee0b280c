"""Continuous batching: requests join and leave a running batch at every decode step.

:class:`ContinuousEngine` owns the model's KV cache as ``max_rows`` fixed slots of ``context`` positions.
Each request gets a slot of its own, with its own length, positions and mask; nothing in a row depends on
what the other rows hold, so a request's greedy answer is the one it gets alone (up to the float noise of a
different batch size in the matmuls), and a seeded one samples the same tokens whatever runs beside it.

One call to :meth:`ContinuousEngine.step` does, in order:

1. **ends** the rows the caller ended (client gone, stop string) and frees their slots;
2. **admits** waiting requests while a slot is free: a newcomer gets the free slot whose cached tokens it can
   reuse the most of (``model.reusable_prefix``: for GLM-4V, which is causal, every common leading token,
   the same image included; for ChatGLM-6B and VisualGLM-6B, whose prompts attend both ways, only an
   identical context), or else the slot of a running row it shares a prefix with, copied, or else a cold
   one; its prompt then only prefills what is new;
3. **prefills** the newcomers admitted together as one group (left-padded to one length, up to a budget of
   new tokens): a long group is spread over several steps, so that running rows keep getting tokens at
   about the pace of a decode step. A lone prompt whose tokens attend causally (GLM-4V) is cut between
   tokens: ``prefill_chunk`` tokens a step, each chunk a whole forward that writes its keys/values and
   attends to the slots before it. Others go a few layers at a time, or pieces of a layer when one layer
   of them costs more than a step may carry (exact: the same computation, paused between pieces; a piece
   writes the keys/values of some tokens or lets some tokens attend to all of them, so ChatGLM-6B's
   prompts, which attend both ways, can be cut too). A short group (up to ``one_step_tokens``, by default twice
   a step's share) is prefilled in
   one step all the same: its first tokens come a step or more sooner, and such steps are few, while a
   long prompt's many steps set the pace every running stream feels. When its last layer is done each
   newcomer's first token is chosen and it joins the decode batch. One group at a time, but **short
   prompts first**: while a long group's prefill runs, waiting prompts that fit one step (a chat turn, or
   a GLM-4V conversation whose earlier turns are cached) take the place of its stage in a step, never two
   steps in a row, so they wait a step, not the whole long prefill;
4. **decodes** one token for every running row in one forward over cache rows ``[0, highest used + 1)``
   (free slots in that range compute a token nobody reads, cheaper than moving a row's cache).

A prefill stage of whole layers (a token chunk included) runs *inside* the decode forward: at each layer it
crosses, its tokens and the decode rows go through the norms, the linear layers and the residuals as one
matrix, only attention apart (``layers.advance_passes``), so a step reads the weights once, not once for the
decode rows and again for the prompt, and runs one set of small ops. On a CPU, where a decode step is the
time to read the weights, that is most of what a step carrying a short prompt's prefill costs extra.
Pieces of a layer (long prompts) run before the decode forward, as do prefills with nothing decoding.

Finished, ended and failed rows free their slot at once; their cached tokens stay there for reuse until a
newcomer needs the slot. The engine is deterministic in its inputs: under tensor parallelism every rank
makes the same ``submit``/``end``/``step`` calls and so runs the same schedule.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from visualglm.generation.engine import GenerationParams
from visualglm.generation.sampling import SamplingParams, make_generator, next_tokens
from visualglm.models.layers import LayerPass, advance_passes, last_positions, run_stages

# Waiting requests ``_admit_short`` looks at for prompts that fit one step (each costs a prefix comparison with
# every slot, so a long queue is not scanned at every step).
SHORT_SCAN = 8


@dataclass
class EngineRequest:
    """One generation. ``ids`` are the prompt ids (images already expanded to their placeholders);
    ``image_embeds`` ``[1, image_length, hidden]`` replace the placeholders from ``image_start`` on, and
    ``image_key`` names the image (two requests share cached image positions only when their keys are equal;
    None: an image that is never shared). ``seed`` seeds the row's sampling generator (None: a fresh one),
    unless ``generator`` gives the generator itself (a chat session continues one across its turns)."""

    id: Hashable
    ids: list[int]
    params: GenerationParams = field(default_factory=GenerationParams)
    seed: int | None = None
    image_start: int | None = None
    image_embeds: torch.Tensor | None = None
    image_key: str | None = None
    generator: torch.Generator | None = None  # the row's sampling generator itself (a chat session's)


@dataclass
class TokenEvent:
    """What one step did for one request: ``token`` is an answer token (None when the row ended without
    one); ``reason`` is None while the row runs on, else ``"stop"`` (it chose a stop id, not an answer
    token), ``"length"`` (its budget is spent, with this token), ``"ended"`` (the caller ended it) or
    ``"error"`` (its token could not be chosen: ``error``)."""

    id: Hashable
    token: int | None
    reason: str | None = None
    error: Exception | None = None


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0
    prefills: int = 0
    prefill_tokens: int = 0  # tokens actually computed by prefills
    reused_tokens: int = 0  # prompt tokens taken from cached slots instead
    joined_steps: int = 0  # decode steps that carried a stage of a prefill in the same forward
    short_first: int = 0  # short prompts prefilled ahead of a long prefill in progress (``_admit_short``)
    largest_batch: int = 0


class _Row:
    """A request in a slot: its tokens so far, positions, budget and generator."""

    def __init__(self, request: EngineRequest, slot: int, budget: int, generator: torch.Generator) -> None:
        self.request = request
        self.slot = slot
        self.budget = budget
        self.generator = generator
        self.sampling = request.params.sampling.validate()
        # Rows whose processing is the same pick their tokens as one batch; a seed lives in the generator.
        self.batch_key = self.sampling.replace(seed=None)
        self.stops = frozenset(request.params.stop_ids)
        self.tokens = torch.tensor([request.ids], dtype=torch.long)  # [1, T]: prompt + answer
        self.produced = 0
        self.length = 0  # cache slots written
        self.position: torch.Tensor | None = None  # [P, 1] of the last token
        self.last: int | None = None  # the token to feed next
        self._written: tuple[int, list[int]] = (0, [])  # (length, its ids): see ``written_ids``

    def written_ids(self) -> list[int]:
        """The ids of the ``length`` tokens in the row's cache slots. Listed once per length: admission
        compares every waiting newcomer with every running row, possibly at every step."""
        if self._written[0] != self.length:
            self._written = (self.length, self.tokens[0, :self.length].tolist())
        return self._written[1]


class _Prefill:
    """The newcomers prefilled together (one forward over their new tokens, left-padded to one length): the
    model's arguments for them, and once started in stages, their generator. ``dropped``: rows ended while
    their prefill ran (their slots are free already; their results are discarded)."""

    def __init__(self, rows: list[_Row], inputs: dict, per_step: float, token_chunk: int | None,
                 later: deque[dict] | None = None, step: int = 0) -> None:
        self.rows = rows
        self.step = step  # the engine step that admitted it
        self.inputs = inputs
        self.per_step = per_step  # layers of work per step beside decoding rows (a fraction: pieces of layers)
        self.token_chunk = token_chunk  # tokens per piece of a layer (None: whole layers)
        self.target = 0.0  # layers done by the end of this step
        self.stages = None  # pieces of layers: the model's stage generator
        self.layer_pass: LayerPass | None = None  # whole layers: the pass through the blocks in progress
        self.dropped: set[int] = set()
        # A causal prompt's later token chunks (the model's arguments for each), run after ``inputs`` in turn,
        # each a pass through every layer (see ``ContinuousEngine._token_chunks``).
        self.later: deque[dict] = later or deque()

    def next_chunk(self) -> bool:
        """Move on to the next token chunk (True), or False when the last one is done."""
        if not self.later:
            return False
        self.inputs, self.layer_pass, self.target = self.later.popleft(), None, 0.0
        return True


class ContinuousEngine:
    """See the module docstring. ``model`` is any decoder of the package; ``max_rows`` slots of ``context``
    positions (default: the model's) are allocated at once. ``prefill_chunk`` tokens: while other rows
    decode, a step carries about that many prompt tokens' worth of prefill through the whole model
    (``prefill_chunk * num_layers`` token-layers: whole layers, or pieces of one), so that no step costs
    much more than a decode step; a group of up to ``one_step_tokens`` new tokens (or ``2 * prefill_chunk``
    if that is more) is prefilled in one step: a short prompt's first token comes at once.
    With nothing else running a prompt is prefilled at once. ``compiled``: a compiled forward
    (``torch.compile`` of the model) for the decode steps, which then keep fixed shapes: the cache rows in
    use rounded up to a bucket (``decode_bucket``), a mask over the whole context. ``join_prefill=False`` runs
    every prefill stage as a forward of its own (for comparison; see the module docstring)."""

    def __init__(self, model: nn.Module, *, max_rows: int, context: int | None = None, prefill_chunk: int = 32,
                 one_step_tokens: int | None = None, pad_id: int | None = None, compiled: Callable | None = None,
                 join_prefill: bool = True) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.model = model
        self.context = context or model.config.max_sequence_length
        self.max_rows = max_rows
        self.prefill_chunk = max(1, prefill_chunk)
        self._one_step_tokens = one_step_tokens
        self.pad_id = model.config.pad_token_id if pad_id is None else pad_id
        self.compiled = compiled
        # Whole-layer prefill stages run inside the decode forward, except with a compiled decode (fixed shapes)
        # or under tensor parallelism (its reductions run on the attention modules' own calls, which a joined
        # block bypasses).
        self.join_prefill = join_prefill and compiled is None and getattr(model, "tensor_parallel", None) is None
        self.device = next(model.parameters()).device
        self.num_layers = len(model.attention_modules())
        model.setup_kv_cache(max_rows, self.context)
        # The engine owns these caches and puts them back in the model at every step: another user of the
        # same model object (a chat session, a test) may have set up caches of its own in between.
        self._caches = [attention.kv_cache for attention in model.attention_modules()]
        self.valid = torch.zeros(max_rows, self.context, dtype=torch.bool, device=self.device)
        self.rows: list[_Row | None] = [None] * max_rows
        # What each slot's cache holds (for reuse by a newcomer): token ids and the image key, oldest first.
        self.cached: list[tuple[list[int], str | None, int | None]] = [([], None, None)] * max_rows
        self.waiting: deque[EngineRequest] = deque()
        self.prefill: _Prefill | None = None
        self._ended: set = set()
        self._short_step = -1  # the last step that admitted short prompts ahead of a long prefill
        self.stats = EngineStats()

    # -- the caller's side ---------------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> None:
        """Queue ``request`` for admission at the next step (its budget is checked now: ValueError)."""
        request.params.budget(len(request.ids), self.context)
        request.params.sampling.validate()
        self.waiting.append(request)

    def end(self, request_id: Hashable) -> None:
        """End a request (waiting or running) at the start of the next step; it gets an ``"ended"`` event."""
        self._ended.add(request_id)

    @property
    def one_step_tokens(self) -> int:
        """New tokens a prefill group may hold and still be prefilled in one step (a short prompt): the
        ``one_step_tokens`` given, or twice the chunk if that is more."""
        return max(2 * self.prefill_chunk, self._one_step_tokens or 0)

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.prefill is not None or any(row is not None for row in self.rows)

    def close(self) -> None:
        """Release the cache (the model's attention modules drop it if it is still there)."""
        for attention, cache in zip(self.model.attention_modules(), self._caches, strict=True):
            if attention.kv_cache is cache:
                attention.kv_cache = None
        self._caches = []

    # -- one step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, early: Callable[[list[TokenEvent]], None] | None = None) -> list[TokenEvent]:
        """One scheduling step (see the module docstring); the events of every request it touched. With
        ``early``, the events known before the decode forward (ended rows, the first tokens of newcomers
        whose prefill ran before it) go to it at once instead, so that those first tokens do not wait for
        the running rows' step. A prefill run inside the decode forward gives its first tokens with it."""
        self.stats.steps += 1
        for attention, cache in zip(self.model.attention_modules(), self._caches, strict=True):
            attention.kv_cache = cache
        events = self._apply_ends()
        self._admit()
        decoding = [row for row in self.rows if row is not None and row.last is not None]
        # The prefill this step advances: short prompts that went ahead of a long one, else the one in progress.
        prefill = self._admit_short(len(decoding)) or self.prefill
        joint = prefill if decoding and self._joins(prefill) else None
        if prefill is not None and joint is None:
            events += self._advance_prefill(prefill, full=not decoding)
        if decoding:
            if early is not None and events:
                early(events)
                events = []
            events += self._decode(decoding, joint)
        return events

    def _joins(self, prefill: _Prefill | None) -> bool:
        """Whether ``prefill``'s stage of this step runs inside the decode forward, sharing its weight reads
        (whole layers only)."""
        return self.join_prefill and prefill is not None and prefill.token_chunk is None

    def _apply_ends(self) -> list[TokenEvent]:
        if not self._ended:
            return []
        events = []
        kept = deque()
        for request in self.waiting:
            if request.id in self._ended:
                events.append(TokenEvent(request.id, None, "ended"))
            else:
                kept.append(request)
        self.waiting = kept
        for row in self.rows:
            if row is not None and row.request.id in self._ended:
                if self.prefill is not None and any(other is row for other in self.prefill.rows):
                    self.prefill.dropped.add(row.slot)
                    row.length = 0  # a half-prefilled cache is of no use to anyone
                    if len(self.prefill.dropped) == len(self.prefill.rows):
                        self.prefill = None
                self._free(row)
                events.append(TokenEvent(row.request.id, None, "ended"))
        self._ended.clear()
        return events

    def _free(self, row: _Row) -> None:
        self.rows[row.slot] = None
        request = row.request
        self.cached[row.slot] = (row.written_ids(), request.image_key, request.image_start)

    # -- admission and prefix reuse ---------------------------------------------------------------------------

    def _reuse(self, slot: int, request: EngineRequest) -> int:
        """How many leading cache slots of ``slot`` ``request`` may take as they are."""
        row = self.rows[slot]
        ids, key, image_start = self.cached[slot] if row is None else (
            row.written_ids(), row.request.image_key, row.request.image_start)
        if not ids:
            return 0
        reuse = self.model.reusable_prefix(ids, request.ids)
        # Image positions hold the image's embeddings, not its placeholder ids: they match only for the
        # same image (a known key), at the same place.
        for start in {image_start, request.image_start} - {None}:
            if reuse > start and (key is None or key != request.image_key or image_start != request.image_start):
                reuse = self.model.reusable_prefix(ids[:start], request.ids) if start else 0
        return reuse

    def _admit(self) -> None:
        """Admit waiting requests into free slots, as one prefill group, while their new tokens fit the group
        budget (the first always joins). One group at a time: the next is admitted once this one has joined
        the decode batch. While rows decode, a prompt to be prefilled in token chunks (``_chunked``) goes
        alone: each of its steps then carries one chunk, not a share of several prompts' layers."""
        if self.prefill is not None or not self.waiting:
            return
        decoding = sum(row is not None and row.last is not None for row in self.rows)
        budget = self.group_tokens(decoding)
        group: list[tuple[_Row, int, torch.Tensor, torch.Tensor]] = []
        total = 0
        alone = False
        while self.waiting:
            request = self.waiting[0]
            place = self._place(request)
            if place is None:
                break
            slot, start, donor = place
            new = len(request.ids) - start
            if group and (alone or total + new > budget):
                break
            positions, mask = self.model.prompt_inputs(torch.tensor([request.ids], device=self.device))
            # Token chunks only beside decoding rows: alone, one forward does the whole prompt at once.
            chunked = bool(decoding) and self._chunked(mask, start)
            if group and chunked:
                break
            alone = chunked
            self.waiting.popleft()
            group.append(self._take(request, slot, start, donor, positions, mask))
            total += new
        if group:
            self.prefill = self._start_prefill(group, chunked=alone)

    def _admit_short(self, decoding: int) -> _Prefill | None:
        """Short prompts first: while a prefill admitted at an earlier step is still in progress beside
        ``decoding`` rows, the waiting prompts (among the first ``SHORT_SCAN``) whose new tokens fit one step
        (up to ``one_step_tokens`` tokens in all, padding included, as a group run whole) are admitted ahead
        of the queue, as a group prefilled in this step in place of the long prefill's stage, which pauses for
        the step (it holds its own pass, stage generator or token chunks, and its slots are its own: pausing
        it changes none of its numbers). A chat turn then waits a step for its first token instead of a long
        prompt's whole prefill. Never on two steps in a row, so the long prefill advances at least every
        other step however many short prompts come. None when there is nothing to admit so."""
        prefill = self.prefill
        if (prefill is None or prefill.step == self.stats.steps or not decoding
                or self._short_step == self.stats.steps - 1):
            return None
        group: list[tuple[_Row, int, torch.Tensor, torch.Tensor]] = []
        taken: list[EngineRequest] = []
        width = 0  # the group's longest new part: rows are left-padded to it, so it is what the step computes
        # Listed once, for the first long prompt among the candidates (a slot taken in the loop only loses ids,
        # so the list can let a prompt through to the full test below, never turn one away wrongly).
        slot_ids: list[list[int]] | None = None
        for request in list(itertools.islice(self.waiting, SHORT_SCAN)):
            # A prompt longer than a step fits only by reusing its excess from a slot, which then starts with
            # those tokens (a model reuses at most the common prefix): a cheap test that spares long prompts
            # the full comparison with every slot at every step.
            excess = len(request.ids) - self.one_step_tokens
            if excess > 0:
                slot_ids = self._slot_ids() if slot_ids is None else slot_ids
                if not any(ids[:excess] == request.ids[:excess] for ids in slot_ids):
                    continue
            place = self._place(request)
            if place is None:
                break
            slot, start, donor = place
            new = len(request.ids) - start
            if max(width, new) * (len(group) + 1) > self.one_step_tokens:
                continue
            positions, mask = self.model.prompt_inputs(torch.tensor([request.ids], device=self.device))
            group.append(self._take(request, slot, start, donor, positions, mask))
            taken.append(request)
            width = max(width, new)
        if not group:
            return None
        # ``request`` may hold tensors, which ``deque.remove``'s equality test cannot compare: by identity.
        self.waiting = deque(waiting for waiting in self.waiting if not any(waiting is t for t in taken))
        self._short_step = self.stats.steps
        self.stats.short_first += len(group)
        return self._start_prefill(group, whole=True)

    def _slot_ids(self) -> list[list[int]]:
        """Each slot's cached token ids: a running row's written tokens, else what the slot kept."""
        return [self.cached[slot][0] if row is None else row.written_ids() for slot, row in enumerate(self.rows)]

    def _place(self, request: EngineRequest) -> tuple[int, int, int] | None:
        """Where ``request`` goes: ``(slot, start, donor)``, the free slot it reuses the most of (with nothing
        to reuse the lowest free one, which keeps the decode batch, cache rows up to the highest in use,
        short), how many leading tokens it reuses, and the slot those come from (a running row's, copied, when
        it shares more than any free slot holds). None when no slot is free."""
        free = [slot for slot, row in enumerate(self.rows) if row is None]
        if not free:
            return None
        reuse = {slot: self._reuse(slot, request) for slot in range(self.max_rows)}
        slot = max(free, key=lambda s: (reuse[s], -s))
        donor = max(range(self.max_rows), key=lambda s: reuse[s])
        if reuse[donor] <= reuse[slot] or donor == slot:
            donor = slot
        return slot, reuse[donor], donor

    def _take(self, request: EngineRequest, slot: int, start: int, donor: int, positions: torch.Tensor,
              mask: torch.Tensor) -> tuple[_Row, int, torch.Tensor, torch.Tensor]:
        """Put ``request`` (out of the queue already) in ``slot``, its first ``start`` cached tokens copied from
        ``donor`` when that is another slot; its entry of a prefill group."""
        if donor != slot:
            self._copy_slots(donor, slot, start)
        return self._new_row(request, slot), start, positions, mask

    def group_tokens(self, decoding: int) -> int:
        """New tokens one prefill group may hold while ``decoding`` rows decode: spread over its stages, a
        stage then costs about what ``max(prefill_chunk, decoding)`` tokens cost through the whole model,
        i.e. about one decode step of that batch (a decode step of B rows does B tokens' worth of matmuls
        once the weights are read)."""
        return max(self.prefill_chunk, decoding) * self.num_layers

    def _copy_slots(self, source: int, target: int, count: int) -> None:
        for attention in self.model.attention_modules():
            cache = attention.kv_cache
            cache.k[target, :, :count] = cache.k[source, :, :count]
            cache.v[target, :, :count] = cache.v[source, :, :count]

    def _new_row(self, request: EngineRequest, slot: int) -> _Row:
        budget = request.params.budget(len(request.ids), self.context)
        generator = request.generator or make_generator(request.seed, self.device)
        row = _Row(request, slot, budget, generator)
        self.rows[slot] = row
        self.cached[slot] = ([], None, None)
        return row

    def _chunked(self, mask: torch.Tensor, start: int) -> bool:
        """Whether a prompt with attention mask ``mask`` ``[1, 1, T, T]`` whose first ``start`` tokens are
        cached is prefilled in token chunks: more than ``one_step_tokens`` new tokens, each attending only to
        those before it (GLM-4V; not ChatGLM-6B's context, which attends both ways)."""
        new = mask[0, 0, start:, :]
        return new.shape[0] > self.one_step_tokens and torch.equal(new, torch.ones_like(new).tril(start))

    def _start_prefill(self, group: list[tuple[_Row, int, torch.Tensor, torch.Tensor]], chunked: bool = False,
                       whole: bool = False) -> _Prefill:
        """Build the model's arguments for ``group`` (rows, how many leading slots each reuses, their positions
        and mask); ``chunked``: a lone row prefilled in token chunks (``_admit`` decided); ``whole``: all in
        this step (``_admit_short``'s group, which nothing else advances). Several rows are left-padded to
        their longest new part (as embeddings when one has an image): a pad query writes its key/value to the
        last cache slot (never attended: it is beyond every row's length) and attends to slot 0 only; its
        output is never read. Every row's last token is then the last position, whose logits give its first
        answer token. Returns the group's prefill, to run from this step on."""
        model = self.model
        parts = []
        for row, start, positions, mask in group:
            request = row.request
            ids = row.tokens.to(self.device)
            length = ids.shape[1]
            embeds = None
            if request.image_embeds is not None and request.image_start is not None:
                embeds = model.embed_with_images(ids, request.image_embeds.to(self.device), [request.image_start])
            self.valid[row.slot] = False
            self.valid[row.slot, :length] = True
            row.position = positions[0, :, -1:]
            parts.append((row, start, ids, positions, mask, embeds))
            self.stats.prefills += 1
            self.stats.prefill_tokens += length - start
            self.stats.reused_tokens += start
        # About prefill_chunk tokens through the whole model per step (prefill_chunk * num_layers token-layers):
        # a step that carries a piece then costs about a decode step more when prefill_chunk is the machine's
        # FLOPs per byte of bandwidth. Less than a layer per step: the layers are cut into token pieces of
        # half a step's work, so that a step overshoots its share by a quarter at most. A group of up to
        # one_step_tokens runs whole: see the module docstring.
        width = max(ids.shape[1] - start for _, start, ids, *_ in parts)
        work = width * len(parts)  # padded tokens: what the matmuls compute
        budget = self.prefill_chunk * self.num_layers
        per_step = self.num_layers if whole or work <= self.one_step_tokens else budget / work
        token_chunk = None if per_step >= 1 else max(16, math.ceil(budget / 2))
        if len(parts) == 1:
            row, start, ids, positions, mask, embeds = parts[0]
            chunks = self._token_chunks(row, start, ids, positions, mask, embeds, chunked)
            if len(chunks) > 1:  # whole forwards, one a step
                per_step, token_chunk = self.num_layers, None
            return _Prefill([row], chunks.popleft(), per_step, token_chunk, later=chunks, step=self.stats.steps)
        kv_length = max(ids.shape[1] for _, _, ids, *_ in parts)
        count, axes = len(parts), parts[0][3].shape[1]
        input_ids = torch.full((count, width), self.pad_id, dtype=torch.long, device=self.device)
        position_ids = torch.zeros(count, axes, width, dtype=torch.long, device=self.device)
        attention = torch.zeros(count, 1, width, kv_length, dtype=torch.bool, device=self.device)
        attention[:, :, :, 0] = True
        cache_positions = torch.full((count, width), self.context - 1, dtype=torch.long, device=self.device)
        # With an image in the group every row comes as embeddings (a text row's are its tokens' own).
        pictured = any(part[5] is not None for part in parts)
        inputs_embeds = None
        if pictured:
            first = next(part[5] for part in parts if part[5] is not None)
            inputs_embeds = first.new_zeros(count, width, first.shape[-1])
        for index, (_, start, ids, positions, mask, embeds) in enumerate(parts):
            length = ids.shape[1]
            pad = width - (length - start)
            input_ids[index, pad:] = ids[0, start:]
            position_ids[index, :, pad:] = positions[0, :, start:]
            attention[index, 0, pad:] = False
            attention[index, 0, pad:, :length] = mask[0, 0, start:, :]
            cache_positions[index, pad:] = torch.arange(start, length, device=self.device)
            if pictured:
                if embeds is None:
                    embeds = model.embed_with_images(ids, None, [None])
                inputs_embeds[index, pad:] = embeds[0, start:]
        slots = torch.tensor([row.slot for row, *_ in parts], dtype=torch.long, device=self.device)
        inputs = dict(input_ids=None if pictured else input_ids, position_ids=position_ids,
                      attention_mask=attention, cache_positions=cache_positions, inputs_embeds=inputs_embeds,
                      cache_rows=slots)
        return _Prefill([row for row, *_ in parts], inputs, per_step, token_chunk, step=self.stats.steps)

    def _token_chunks(self, row: _Row, start: int, ids: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, embeds: torch.Tensor | None, chunked: bool) -> deque[dict]:
        """The model's arguments for one row's new tokens ``[start, length)``: one forward, or when
        ``chunked`` (a prompt longer than one step's whose tokens attend causally, GLM-4V's: see ``_chunked``)
        consecutive chunks of ``prefill_chunk`` tokens, each a whole forward that writes its keys/values and
        attends to the slots before it: the same computation as one forward, cut between tokens. Each chunk
        then runs inside a decode step's forward (one weight read for both) where pieces of layers could
        not. A prompt that attends both ways (ChatGLM-6B's context) is one forward, staged by layers."""
        length = ids.shape[1]
        size = self.prefill_chunk if chunked else length - start
        chunks: deque[dict] = deque()
        for begin in range(start, length, size):
            end = min(begin + size, length)
            chunks.append(dict(input_ids=ids[:, begin:end] if embeds is None else None,
                               position_ids=positions[..., begin:end], attention_mask=mask[:, :, begin:end, :end],
                               cache_positions=torch.arange(begin, end, device=self.device),
                               inputs_embeds=None if embeds is None else embeds[:, begin:end],
                               cache_rows=slice(row.slot, row.slot + 1)))
        return chunks

    def _advance_prefill(self, prefill: _Prefill, full: bool) -> list[TokenEvent]:
        """Run ``prefill`` on its own: when ``full``, all it has left, else this step's share of
        layers; the newcomers' first tokens once the last layer is done. Whole layers go as a pass through the
        blocks (as inside a decode forward), pieces of layers through the model's stage generator (a
        prefill not begun that may run whole runs as one pass all the same)."""
        if prefill.token_chunk is None or (full and prefill.stages is None):
            while True:  # with ``full``, every token chunk in turn
                advance_passes(self.model.decoder_blocks(), [self._pass_of(prefill)],
                               [self._pass_stop(prefill, full)])
                events = self._pass_events(prefill)
                if events or not full or self.prefill is not prefill:
                    return events
        if prefill.stages is None:
            prefill.stages = self.model.hidden_state_stages(**prefill.inputs, token_chunk=prefill.token_chunk)
        prefill.target = math.inf if full else prefill.target + prefill.per_step
        while True:
            done = next(prefill.stages)
            if done >= self.num_layers:  # the last layer: take the final norm now
                hidden = run_stages(prefill.stages)
                break
            if done >= prefill.target:
                return []
        return self._prefill_done(prefill, self._logits(hidden))

    def _pass_of(self, prefill: _Prefill) -> LayerPass:
        """``prefill``'s pass through the blocks, started before block 0 the first time."""
        if prefill.layer_pass is None:
            prefill.layer_pass = self.model.start_pass(**prefill.inputs)
        return prefill.layer_pass

    def _pass_stop(self, prefill: _Prefill, full: bool) -> int:
        """The block ``prefill``'s pass stops before this step: the end when ``full``, else one more share."""
        if full:
            return self.num_layers
        prefill.target += prefill.per_step
        return min(self.num_layers, math.ceil(prefill.target))

    def _pass_events(self, prefill: _Prefill) -> list[TokenEvent]:
        """The newcomers' first tokens once ``prefill``'s pass is through every block (none before), the
        last token chunk's pass when there are several (an earlier one moves the prefill on to the next)."""
        if prefill.layer_pass.next < self.num_layers or prefill.next_chunk():
            return []
        return self._prefill_done(prefill, self._last_logits(prefill.layer_pass))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits ``[B, vocab]`` of the last position of final hidden states ``[B, T, hidden]``."""
        return self.model.output_logits(last_positions(hidden, 1))[:, -1].float()

    def _last_logits(self, layer_pass: LayerPass) -> torch.Tensor:
        """``_logits`` of a pass through every block (its final norm taken on the last position only)."""
        return self._logits(self.model.final_norm(last_positions(layer_pass.x, 1)))

    def _prefill_done(self, prefill: _Prefill, logits: torch.Tensor) -> list[TokenEvent]:
        """``prefill`` is through every layer: its rows' first tokens from ``logits`` ``[rows, vocab]`` (one row
        per newcomer, in order); they join the decode batch."""
        if prefill is self.prefill:
            self.prefill = None
        kept = [index for index, row in enumerate(prefill.rows) if row.slot not in prefill.dropped]
        rows = [prefill.rows[index] for index in kept]
        for row in rows:
            row.length = row.tokens.shape[1]
        return self._choose(rows, logits[kept])

    # -- decoding ------------------------------------------------------------------------------------------

    def _decode(self, decoding: list[_Row], joint: _Prefill | None = None) -> list[TokenEvent]:
        """One token for every decoding row. With ``joint`` (the waiting prefill), this step's stage of the
        prefill runs in the same forward: the layers both cross run once over the decode rows' and the
        prompt's tokens together, so their weights are read once (a separate stage would read them again)."""
        model = self.model
        static = self.compiled is not None
        high = max(row.slot for row in decoding) + 1
        if static:  # a fixed set of shapes: one compiled graph per bucket
            high = decode_bucket(high, self.max_rows)
        self.stats.decode_steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(decoding))
        tokens = torch.full((high, 1), self.pad_id, dtype=torch.long)
        slots = torch.full((high, 1), self.context - 1, dtype=torch.long)  # free rows write a slot never read
        template = decoding[0].position
        positions = torch.zeros(high, *template.shape, dtype=template.dtype, device=self.device)
        kv_length = self.context if static else max(row.length for row in decoding) + 1
        for row in decoding:
            tokens[row.slot, 0] = row.last
            slots[row.slot, 0] = row.length
            row.position = model.next_position_ids(row.position[None])[0]
            positions[row.slot] = row.position
            self.valid[row.slot, row.length] = True
        mask = self.valid[:high, None, None, :kv_length].clone()
        forward = self.compiled if static else model
        if static:  # CUDA graphs reuse their output buffers at the next replay (the logits are read below)
            torch.compiler.cudagraph_mark_step_begin()
        events = []
        inputs = (tokens.to(self.device), positions, mask)
        cache = dict(cache_positions=slots.to(self.device), cache_rows=slice(0, high))
        if joint is None:
            logits = forward(*inputs, **cache)[:, -1].float()
        else:
            step = model.start_pass(*inputs, **cache)
            self.stats.joined_steps += 1
            advance_passes(model.decoder_blocks(), [step, self._pass_of(joint)],
                           [self.num_layers, self._pass_stop(joint, full=False)])
            logits = self._last_logits(step)
            events += self._pass_events(joint)
        for row in decoding:
            row.length += 1
        return events + self._choose(decoding, logits[[row.slot for row in decoding]])

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[TokenEvent]:
        """Pick each row's next token from its ``logits`` row (``[len(rows), vocab]``); ends the rows that
        are done. Rows with the same sampling settings are processed as one batch, each drawing from its
        own generator: the same tokens as one row at a time, without a chain of small ops per row."""
        groups: dict[SamplingParams, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row.batch_key, []).append(index)
        picks: dict[int, int | Exception] = {}
        for params, members in groups.items():
            picks.update(zip(members, self._pick([rows[i] for i in members], logits[members], params),
                             strict=True))
        return [self._settle(row, picks[index]) for index, row in enumerate(rows)]

    @staticmethod
    def _pick(rows: list[_Row], logits: torch.Tensor, params: SamplingParams) -> list[int | Exception]:
        """The next token of each of ``rows`` (equal ``params``), or the error that row's scores raised."""
        try:
            token_ids, valid = None, None
            if params.repetition_penalty != 1.0:  # the rows' own tokens, right-padded to one length
                token_ids = torch.nn.utils.rnn.pad_sequence([row.tokens[0] for row in rows], batch_first=True)
                lengths = torch.tensor([row.tokens.shape[1] for row in rows])
                valid = torch.arange(token_ids.shape[1]) < lengths[:, None]
                token_ids, valid = token_ids.to(logits.device), valid.to(logits.device)
            return next_tokens(logits, token_ids, params, [row.generator for row in rows], valid).tolist()
        except Exception as exc:  # NaN scores, ...: confined to the row that has them
            if len(rows) == 1:
                return [exc]
            return [ContinuousEngine._pick([row], logits[i:i + 1], params)[0] for i, row in enumerate(rows)]

    def _settle(self, row: _Row, pick: int | Exception) -> TokenEvent:
        """Record ``row``'s new token (or its error); ends the row when it is done."""
        request = row.request
        if isinstance(pick, Exception):  # this row ends, the others go on
            self._free(row)
            return TokenEvent(request.id, None, "error", pick)
        token = pick
        if token in row.stops:
            self._free(row)
            return TokenEvent(request.id, None, "stop")
        row.produced += 1
        row.tokens = torch.cat((row.tokens, torch.tensor([[token]])), dim=1)
        row.last = token
        if row.produced >= row.budget:
            self._free(row)
            return TokenEvent(request.id, token, "length")
        return TokenEvent(request.id, token)


def decode_bucket(rows: int, max_rows: int) -> int:
    """Rows a compiled decode step runs for ``rows`` cache rows in use: the next power of two, at most
    ``max_rows`` (so at most log2(max_rows) + 2 shapes, each compiled once)."""
    if not 1 <= rows <= max_rows:
        raise ValueError(f"rows must be in 1..{max_rows}, got {rows}")
    return min(max_rows, 1 << (rows - 1).bit_length())


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values, the cache's dtype)."""
    heads, head_dim = model.kv_cache_layout()
    weight = model.get_input_embeddings().weight
    dtype = weight.dtype if weight.is_floating_point() else torch.bfloat16
    return 2 * heads * head_dim * len(model.attention_modules()) * torch.finfo(dtype).bits // 8


def rows_for_budget(model: nn.Module, context: int, max_rows: int, budget_bytes: int | None) -> int:
    """Slots that fit ``budget_bytes`` of KV cache (each ``context`` positions), at most ``max_rows``, at
    least 1 (None: no budget)."""
    if budget_bytes is None:
        return max_rows
    return max(1, min(max_rows, budget_bytes // (context * kv_bytes_per_token(model))))

