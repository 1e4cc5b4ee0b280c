"""Building blocks shared by the decoders: rotary position encodings and the attention core."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Additive bias for blocked attention positions. ChatGLM-6B fills masked scores with -10000 (not -inf):
# a fully blocked row (a left-padding query) then stays finite instead of turning into NaN, which would
# otherwise leak into every later layer through the padded keys/values.
MASK_FILL = -10000.0


def rotary_inv_freq(rot_dim: int, base: float = 10000.0, device: torch.device | str | None = None,
                    round_to_fp16: bool = False) -> torch.Tensor:
    """Inverse frequencies ``[rot_dim // 2]`` (fp32) of a rotary table over ``rot_dim`` dimensions.

    ``round_to_fp16`` reproduces ChatGLM-6B, which stores its ``inv_freq`` as float16 whatever the model dtype.
    """
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim
    inv_freq = 1.0 / (base ** exponents)
    return inv_freq.half().float() if round_to_fp16 else inv_freq


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[*positions.shape, 2 * len(inv_freq)]`` in the "rotate half" layout (freqs repeated twice).

    Angles are computed in float16 when the model runs in float16 (the reference builds its table from a
    float16 position vector, so this is what the released fp16 checkpoints were trained and evaluated
    with) and in float32 otherwise; the result is cast to ``dtype``.
    """
    compute_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    angles = positions.to(compute_dtype).unsqueeze(-1) * inv_freq.to(compute_dtype)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: int) -> torch.Tensor:
    """Rotate ``x`` ``[..., D]`` by cos/sin ``[..., D]`` (broadcastable), "rotate half" inside each of ``chunks``.

    With ``chunks=2`` this is ChatGLM's 2D encoding: dims ``[0, D/2)`` and ``[D/2, D)`` are two independent
    rotary groups, each pairing dim ``j`` with ``j + D/4``.
    """
    shape = x.shape
    halves = x.reshape(*shape[:-1], chunks, 2, shape[-1] // (2 * chunks))
    rotated = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).reshape(shape)
    return x * cos + rotated * sin


# How one decode query per head attends on CPU (``single_query`` of ``attention``/``attention_gqa``):
# "matmul" (two matmuls, the softmax in fp32) or "sdpa" (PyTorch's fused kernel), or a kernel from outside the
# model code (a ``SingleQueryKernel``: the optional compiled one). Which is faster depends on the CPU and dtype,
# so the model never decides: ``visualglm.checkpoint.cpu_kernels`` sets the attention modules'
# ``single_query`` attribute at load time.
SINGLE_QUERY_KERNELS = ("matmul", "sdpa")
# q ``[B, G, R, D]`` (R query rows per key/value head), k/v ``[B, G, S, D]``, bias ``[B, 1, 1, S]`` or None ->
# ``[B, G, R, D]``, or None when it does not take these inputs (the "matmul" kernel runs instead).
SingleQueryKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              single_query: str | SingleQueryKernel = "matmul") -> torch.Tensor:
    """Scaled dot-product attention. q ``[B, H, T, D]``, k/v ``[B, H, S, D]``, bias ``[B, 1, T, S]`` or None
    (read-only once attended with: a forward makes its bias once and every layer reads it).

    Returns ``[B, H, T, D]``. The scale is 1/sqrt(D); the reference's extra (layer_id + 1) division and
    multiplication only guards fp16 overflow in its unfused kernel and cancels out mathematically.
    ``single_query``: the kernel of a decode step on CPU (see ``SINGLE_QUERY_KERNELS``).
    """
    if _single_query_on_cpu(q):
        if single_query == "sdpa":
            return _ragged_sdpa(q, k, v, bias)
        return _given_or_matmul(single_query, q, k, v, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(q.shape[-1]))


# A decode batch whose rows have their own lengths (a continuous batch; the batch reads up to the longest)
# attends row by row, reading only each row's own keys, when that saves more than this many bytes of
# keys/values per row: a call of the fused kernel costs ~15 us, the time to read ~250 KB here. 8 rows of 20
# to 580 tokens read 9 MB less a layer with ChatGLM's 16 heads of 64 (431 -> 356 us), but only 1.2 MB less
# with GLM-4's 2 key/value groups, where the padded batch is the faster (114 against 205 us; 2-vCPU Xeon).
RAGGED_MIN_SAVED_BYTES = 256 * 1024
# The same for the two 16-bit matmuls, which copy the keys/values they read first (``_single_query_attention``):
# a row costs more calls there (copies, matmuls, softmax). 2-vCPU Zen 4 EPYC, 151M ChatGLM shape, decode step
# with rows of 500/60/60/60/30/30/30/30 cached tokens (1.6 MB a row saved): 44.2 padded, 41.4 ms row by row
# (``python -m benchmarks.decode_attention``); one layer with rows of 300/200/100 (0.4 MB a row saved):
# 239 us padded, 438 us row by row.
RAGGED_MATMUL_MIN_SAVED_BYTES = 1024 * 1024


def _ragged_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's fused attention for one query per head (q ``[B, H, 1, D]``, k/v ``[B, G, S, D]``, bias
    ``[B, 1, 1, S]`` or None; G < H: grouped), row by row over each row's visible slots when the rows'
    lengths differ enough (see ``RAGGED_MIN_SAVED_BYTES``). Row i sees slots before its last visible one, with the
    same bias there: the same keys and weights as the padded batch (the blocked slots past a row's end
    weigh exp(-10000) = 0 in it).

    Grouped heads are folded into query rows: the R = H / G heads of a group become R queries of one
    key/value head (``[B, G, R, D]``), so each group's keys are read once. The kernel's own grouped mode
    (``enable_gqa``) ran 2.5x slower here (8 rows, 2 groups of 16 heads, 300-580 cached tokens: 282 against
    112 us a layer, 2-vCPU Xeon)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    batch, heads, _, dim = q.shape
    folded = q.reshape(batch, k.shape[1], heads // k.shape[1], dim)  # [B, G, R, D], a view
    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    ends = _row_ends(bias, k)
    out = fused(folded, k, v, bias) if ends is None else _row_by_row(fused, folded, k, v, bias, ends)
    return out.reshape(batch, heads, 1, dim)


def _row_by_row(kernel: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """``kernel(q, k, v, bias)`` on each row i alone, over its slots ``[0, ends[i])`` (``_row_ends``): q
    ``[B, G, R, D]``, k/v ``[B, G, S, D]``, bias ``[B, 1, 1, S]`` -> ``[B, G, R, D]``."""
    return torch.cat([kernel(q[i:i + 1], k[i:i + 1, :, :end], v[i:i + 1, :, :end], bias[i:i + 1, ..., :end])
                      for i, end in enumerate(ends)])


# The last bias ``_row_ends`` read and its answer: every layer of a forward gets the same bias tensor (made
# once per forward, never written after), so the rows' ends (a host sync) are found once per forward, not
# once per layer. The reference held here keeps the tensor alive, so a new forward's bias can never be
# mistaken for it. (Inference tensors have no version counter to check.)
_last_ends: tuple[torch.Tensor | None, int, list[int] | None] = (None, 0, None)


def _row_ends(bias: torch.Tensor | None, k: torch.Tensor, min_saved: int | None = None) -> list[int] | None:
    """One past each row's last visible slot when attending row by row reads enough less of the keys ``k``
    ``[B, G, S, D]`` and their values than the padded batch (``min_saved`` bytes a row, default
    ``RAGGED_MIN_SAVED_BYTES``), else None."""
    global _last_ends
    batch, groups, slots, dim = k.shape
    if bias is None or batch == 1 or bias.shape[0] != batch:
        return None
    min_saved = RAGGED_MIN_SAVED_BYTES if min_saved is None else min_saved
    cached, cached_min, ends = _last_ends
    if cached is bias and cached_min == min_saved:
        return ends
    visible = bias[:, 0, 0, :] > MASK_FILL / 2  # [B, S]
    # One past each row's last visible slot (a row with none, a free slot nobody reads: one slot).
    ends = torch.where(visible.any(dim=-1), slots - visible.flip(-1).int().argmax(dim=-1), 1).tolist()
    saved = (batch * slots - sum(ends)) * groups * dim * 2 * k.element_size()
    ends = ends if saved > min_saved * batch else None
    _last_ends = (bias, min_saved, ends)
    return ends


class _KeptCopies:
    """Memory the 16-bit single-query kernel copies a decode step's keys/values into, kept between layers
    and steps.

    A fresh tensor of that size costs page faults each time: the allocator maps copies over 32 MB (glibc's
    largest mmap threshold) freshly and unmaps them on free. 2-vCPU Zen 4 EPYC, bf16, one layer of 8 rows x
    1,000 cached tokens at ChatGLM-6B's 32 heads of 128 (65 MB of keys): a fresh copy 19.7 ms, into kept
    memory 2.7 ms; the layer's attention 50 -> 16 ms.

    A call takes a (keys, values) pair of buffers from the free list and puts it back when done, so calls
    in several threads at once each get their own pair (list pop/append are atomic). A buffer grows by half
    when a copy outgrows it and is never shrunk: each pair holds at most 1.5 x one layer's keys and values
    of the largest decode batch, and there are as many pairs as calls ever ran at the same time.
    """

    def __init__(self) -> None:
        self.free: dict[tuple[torch.dtype, torch.device, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        """``_matmul_attention`` on copies of ``k``/``v`` in kept memory (tensors autograd does not track)."""
        # Inference-mode tensors cannot be written outside inference mode: each mode has its own buffers.
        free = self.free.setdefault((k.dtype, k.device, torch.is_inference_mode_enabled()), [])
        try:
            keys, values = free.pop()
        except IndexError:  # the first call, or every pair in use by other threads
            keys, values = k.new_empty(0), v.new_empty(0)
        keys, values = _with_room(keys, k.numel()), _with_room(values, v.numel())
        try:
            return _matmul_attention(q, keys[:k.numel()].view(k.shape).copy_(k),
                                     values[:v.numel()].view(v.shape).copy_(v), bias)
        finally:
            free.append((keys, values))


def _with_room(buffer: torch.Tensor, count: int) -> torch.Tensor:
    """``buffer`` (1-D) if it holds ``count`` elements, else a new one half as large again (or ``count``)."""
    if buffer.numel() >= count:
        return buffer
    return buffer.new_empty(max(count, buffer.numel() * 3 // 2))


_KEPT_COPIES = _KeptCopies()


def _single_query_on_cpu(q: torch.Tensor) -> bool:
    # A decode step (one query per head) on CPU. On a 2-core AVX-512 EPYC (Zen 4) PyTorch's fused CPU kernel
    # spent 3-4 ms per layer on a single query row of a 32-head model (bf16, 128 to 1000 cached tokens)
    # against ~0.2-0.9 ms for two matmuls. On an AMX Xeon the fused kernel is the fast one (1.9 ms against
    # 34 ms for 8 rows of 540 cached tokens: a continuous batch's cache rows are strided views, which the
    # bf16 matmul copies first).
    return q.shape[2] == 1 and q.device.type == "cpu"


def _given_or_matmul(single_query: str | SingleQueryKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """A decode step (q ``[B, G, R, D]``, k/v ``[B, G, S, D]``) on the given kernel if it takes the inputs,
    else on the two matmuls."""
    if callable(single_query):
        out = single_query(q, k, v, bias)
        if out is not None:
            return out
    return _single_query_attention(q, k, v, bias)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
                            ) -> torch.Tensor:
    """Attention for one query per head: q ``[B, G, R, D]`` (R query rows per key/value head),
    k/v ``[B, G, S, D]``, bias broadcastable to ``[B, G, R, S]`` -> ``[B, G, R, D]``.

    Scores come out of the matmul in the inputs' dtype (as eager attention does in bf16/fp16) and the
    softmax runs in fp32; in fp32 this is the textbook formula.
    """
    if k.dtype != torch.float32 and not (k.is_contiguous() and v.is_contiguous()):
        ends = _row_ends(bias, k, RAGGED_MATMUL_MIN_SAVED_BYTES)
        if ends is not None:  # rows of very different lengths: each over its own slots (see the constant)
            return _row_by_row(_single_query_attention, q, k, v, bias, ends)
        # The cached keys/values are a slice of each slot's cache (strided): PyTorch's 16-bit batched matmul
        # takes a slow path on such views, and copying them first is cheaper than that path. 2-vCPU Zen 4
        # EPYC, 151M ChatGLM shape (16 heads of 64), decode step with 8 rows of 600 cached tokens 83.1 ->
        # 56.7 ms, 1 row of 16 tokens 24.4 -> 22.1 ms (``python -m benchmarks.decode_attention``). In fp32
        # the strided matmul is the faster (8 rows of 600, one layer: 2.7 against 11.9 ms with copies).
        if not (q.requires_grad or k.requires_grad or v.requires_grad):  # (autograd keeps what it multiplies)
            return _KEPT_COPIES.attend(q, k, v, bias)
        k, v = k.contiguous(), v.contiguous()
    return _matmul_attention(q, k, v, bias)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
                      ) -> torch.Tensor:
    """Two matmuls and the softmax between them in fp32 (shapes as ``_single_query_attention``)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def last_positions(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """The last ``count`` positions of ``hidden`` ``[B, T, H]`` as a fresh contiguous ``[B, count, H]``.

    A plain slice keeps the stride of the T axis (T * H) and still reports itself contiguous when
    ``count`` is 1; PyTorch's bf16 CPU linear then copies the whole weight before multiplying: 5-10 s and a
    1 GiB temporary for ChatGLM-6B's 130528-row output layer, against 0.06 s on the copied rows.
    """
    return hidden[:, -count:].clone(memory_format=torch.contiguous_format)


def blocked_to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive bias with ``MASK_FILL`` at blocked positions."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, MASK_FILL)


def attention_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                  causal: bool = False, single_query: str | SingleQueryKernel = "matmul") -> torch.Tensor:
    """Grouped-query attention: q ``[B, H, T, D]``, k/v ``[B, G, S, D]`` with H a multiple of G (group g
    serves heads ``g*H/G .. (g+1)*H/G - 1``). ``causal`` applies a lower-triangular mask (T == S).
    ``single_query``: the kernel of a decode step on CPU (see ``SINGLE_QUERY_KERNELS``)."""
    groups = q.shape[1] // k.shape[1]
    one_query = _single_query_on_cpu(q) and not (causal and bias is None and k.shape[2] > 1)
    if one_query and single_query == "sdpa":
        return _ragged_sdpa(q, k, v, bias)
    if one_query:
        # The heads of a group share one key/value head: fold them into query rows (no copy of the cache).
        batch, heads, _, dim = q.shape
        rows = q.reshape(batch, k.shape[1], groups, dim)
        return _given_or_matmul(single_query, rows, k, v, bias).reshape(batch, heads, 1, dim)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None,
                                          scale=1.0 / math.sqrt(q.shape[-1]))


def attention_span(attention_mask: torch.Tensor | None, cache_positions: torch.Tensor | None, length: int,
                   dtype: torch.dtype) -> tuple[int, torch.Tensor | None]:
    """How many key slots the queries attend to, and the additive bias of ``attention_mask``.

    With a mask ``[B, 1, T, S]`` the queries see S slots; with a cache and no mask (a decode step without
    padding) every slot up to the last one written; otherwise the T tokens themselves.
    """
    if attention_mask is not None:
        return attention_mask.shape[-1], blocked_to_bias(attention_mask, dtype)
    if cache_positions is not None:
        return int(cache_positions[-1]) + 1, None
    return length, None


# The share of a layer's work that writing its keys/values takes: the QKV projection is 3 of the 12
# hidden^2 multiply-adds per token of a ChatGLM-6B block (less with GLM-4's grouped keys). A guide for a
# scheduler spreading a prefill over steps, nothing more.
KEYS_SHARE = 0.25


def chunked_layer(length: int, chunk: int, write_keys: Callable[[int, int], torch.Tensor],
                  finish: Callable[[int, int, torch.Tensor], torch.Tensor], done: int = 0
                  ) -> Generator[float, None, torch.Tensor]:
    """One layer over a prompt of ``length`` new tokens, ``chunk`` tokens at a time, exactly: first every
    chunk's keys/values are written (``write_keys(start, end)`` returns that chunk's queries), then each
    chunk's queries attend to the whole prompt (``finish(start, end, queries)`` returns the chunk's layer
    output ``[B, end - start, hidden]``). A prompt whose tokens attend both ways (ChatGLM-6B's context) can
    so be cut inside a layer too. Yields the layers done after each piece (``done`` plus the share of this
    one, ``done + 1`` last) and returns the layer's output ``[B, length, hidden]``."""
    bounds = [(start, min(start + chunk, length)) for start in range(0, length, chunk)]
    queries = []
    for start, end in bounds:
        queries.append(write_keys(start, end))
        yield done + KEYS_SHARE * end / length
    outputs = []
    for (start, end), query in zip(bounds, queries, strict=True):
        outputs.append(finish(start, end, query))
        yield done + 1 if end == length else done + KEYS_SHARE + (1 - KEYS_SHARE) * end / length
    return torch.cat(outputs, dim=1)


def flatten_groups(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Size]]:
    """Several groups of tokens (each ``[B_i, T_i, features]``) as one matrix ``[sum B_i * T_i, features]``
    and the groups' leading shapes (for :func:`unflatten_groups`). Token-wise work (norms, linear layers,
    residuals) then runs once over every group: one set of small ops, and each weight read once."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), [x.shape[:-1] for x in xs]


def unflatten_groups(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """The inverse of :func:`flatten_groups` for any trailing width: ``[N, features]`` -> each
    ``[*shapes[i], features]`` (views)."""
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(*shape, part.shape[-1]) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


def embeddings_of(embed: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor | None,
                  inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """A forward's input ``[B, T, hidden]``: ``inputs_embeds`` when given, else ``embed(input_ids)``."""
    if inputs_embeds is not None:
        return inputs_embeds
    if input_ids is None:
        raise ValueError("pass input_ids or inputs_embeds")
    return embed(input_ids)


@dataclass
class LayerPass:
    """A forward through a decoder's blocks in progress: the hidden states ``x`` ``[B, T, hidden]`` entering
    block ``next`` and ``args``, the attention arguments every block takes after x (positions, mask, cache
    slots and rows: the model's layout). Several passes at the same block run it together
    (:func:`advance_passes`)."""

    x: torch.Tensor
    args: tuple
    next: int = 0


def advance_passes(blocks: Sequence, passes: Sequence[LayerPass], stops: Sequence[int]) -> None:
    """Run each pass through the blocks up to block ``stops[i]`` (exclusive). Passes standing at the same
    block run it together, one ``forward_joint`` call: the block's weights are read once for all of their
    tokens. A decode step and a stage of a newcomer's prefill so share the weights of the layers both cross."""
    for layer in range(min(p.next for p in passes), max(stops)):
        group = [p for p, stop in zip(passes, stops, strict=True) if p.next == layer < stop]
        if not group:
            continue
        outputs = blocks[layer].forward_joint([(p.x, p.args) for p in group])
        for p, out in zip(group, outputs, strict=True):
            p.x, p.next = out, layer + 1


def run_stages(stages: Iterator[int]) -> torch.Tensor:
    """Run a model's ``hidden_state_stages`` generator to the end and return its value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            # ``args[0]`` is ``value``; torch.compile traces this form (not ``.value``), so a compiled
            # forward stays one graph (``fullgraph=True``, CUDA graphs).
            return done.args[0] if done.args else None


def common_prefix_length(a, b) -> int:
    """Number of leading equal items of two sequences."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def splice_image_embeddings(embeds: torch.Tensor, image_embeds: torch.Tensor | None,
                            image_starts) -> torch.Tensor:
    """Token embeddings ``[B, T, hidden]`` with row b's ``[start, start + N)`` replaced by ``image_embeds[b]``
    ``[N, hidden]`` (rows whose start is None stay text-only). A span that does not fit the row is a
    ValueError naming it, never a silent partial write. Returns ``embeds`` itself when there is no image."""
    if image_embeds is None:
        return embeds
    embeds = embeds.clone()
    width = image_embeds.shape[1]
    for row, start in enumerate(image_starts):
        if start is None:
            continue
        if start < 0 or start + width > embeds.shape[1]:
            raise ValueError(f"image span [{start}, {start + width}) does not fit a prompt of "
                             f"{embeds.shape[1]} tokens")
        embeds[row, start:start + width] = image_embeds[row]
    return embeds
