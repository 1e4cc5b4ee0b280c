"""The single-query (decode step) attention path against PyTorch's fused kernel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visualglm.models import layers
from visualglm.models.layers import MASK_FILL, attention, attention_gqa


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=None if bias is None else bias.double(),
                                          scale=1.0 / math.sqrt(q.shape[-1]))


def _inputs(heads: int, kv_heads: int, slots: int, masked: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(heads * 100 + slots)
    q = torch.randn(2, heads, 1, 16, generator=gen, dtype=dtype)
    k = torch.randn(2, kv_heads, slots, 16, generator=gen, dtype=dtype)
    v = torch.randn(2, kv_heads, slots, 16, generator=gen, dtype=dtype)
    bias = None
    if masked:  # row 1 is left-padded by 3 slots
        allowed = torch.ones(2, 1, 1, slots, dtype=torch.bool)
        allowed[1, ..., :3] = False
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, MASK_FILL)
    return q, k, v, bias


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("slots", [1, 7, 40])
def test_one_query_per_head_matches_fused_kernel(slots: int, masked: bool, kernel: str) -> None:
    q, k, v, bias = _inputs(4, 4, slots, masked)
    out = attention(q, k, v, bias, single_query=kernel)
    assert out.shape == (2, 4, 1, 16)
    torch.testing.assert_close(out.double(), _reference(q, k, v, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_decode_matches_fused_kernel(kv_heads: int, masked: bool, kernel: str) -> None:
    q, k, v, bias = _inputs(8, kv_heads, 9, masked)
    out = attention_gqa(q, k, v, bias, single_query=kernel)
    assert out.shape == (2, 8, 1, 16)
    torch.testing.assert_close(out.double(), _reference(q, k, v, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_bf16_decode_stays_close_to_float64(kernel: str) -> None:
    q, k, v, bias = _inputs(8, 8, 64, True, dtype=torch.bfloat16)
    out = attention(q, k, v, bias, single_query=kernel)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(q, k, v, bias), atol=3e-2, rtol=3e-2)


def test_last_positions_are_a_fresh_contiguous_copy() -> None:
    from visualglm.models.layers import last_positions

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    kept = last_positions(hidden, 1)
    assert torch.equal(kept, hidden[:, -1:])
    assert kept.stride() == (3, 3, 1)  # not the slice's (15, 3, 1), which slows bf16 CPU linears badly
    assert torch.equal(last_positions(hidden, 2), hidden[:, -2:]) and last_positions(hidden, 2).stride() == (6, 3, 1)


def test_strided_cache_rows_give_the_same_answer_with_both_kernels() -> None:
    """A continuous batch reads its cache as a strided view (rows of a longer preallocated cache)."""
    gen = torch.Generator().manual_seed(3)
    cache_k = torch.randn(3, 4, 50, 16, generator=gen)
    cache_v = torch.randn(3, 4, 50, 16, generator=gen)
    q = torch.randn(3, 4, 1, 16, generator=gen)
    k, v = cache_k[:, :, :21], cache_v[:, :, :21]
    assert not k.is_contiguous()
    want = _reference(q, k, v, None)
    for kernel in ("matmul", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, None, single_query=kernel).double(), want, atol=1e-5,
                                   rtol=1e-5)


def _ragged_bias(ends: list[int], slots: int) -> torch.Tensor:
    """The bias ``[rows, 1, 1, slots]`` of a continuous batch whose row i sees slots ``[0, ends[i])``, row 2
    left-padded by 4 slots inside that."""
    allowed = torch.zeros(len(ends), 1, 1, slots, dtype=torch.bool)
    for row, end in enumerate(ends):
        allowed[row, ..., :end] = True
    allowed[2, ..., :4] = False  # left padding inside the row
    return torch.zeros(allowed.shape).masked_fill_(~allowed, MASK_FILL)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rows_of_very_different_lengths_attend_row_by_row_to_the_same_answer(kv_heads: int, monkeypatch) -> None:
    """A continuous batch: each row sees its own number of slots (one row left-padded), the batch spans the
    longest. The fused kernel then runs row by row over each row's own slots (see RAGGED_MIN_SAVED_BYTES)."""
    gen = torch.Generator().manual_seed(11)
    slots, ends = 60, [60, 5, 12, 30]
    q = torch.randn(4, 4, 1, 16, generator=gen)
    k = torch.randn(4, kv_heads, slots, 16, generator=gen)
    v = torch.randn(4, kv_heads, slots, 16, generator=gen)
    bias = _ragged_bias(ends, slots)
    want = _reference(q, k, v, bias)
    calls = []
    sdpa = layers.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", counted)
    for min_saved, kernel_calls in ((16, 4), (1 << 20, 1)):  # row by row, or (too little saved) padded
        monkeypatch.setattr(layers, "RAGGED_MIN_SAVED_BYTES", min_saved)
        calls.clear()
        bias = bias.clone()  # a new forward's bias (one bias is read-only once attended with)
        got = attention_gqa(q, k, v, bias, single_query="sdpa") if kv_heads != 4 else \
            attention(q, k, v, bias, single_query="sdpa")
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert len(calls) == kernel_calls
    # A row that sees nothing (a free slot of the batch, whose output nobody reads) does not disturb the rest.
    monkeypatch.setattr(layers, "RAGGED_MIN_SAVED_BYTES", 16)
    bias = bias.clone()
    bias[3] = MASK_FILL
    got = attention(q, k.repeat_interleave(4 // kv_heads, 1), v.repeat_interleave(4 // kv_heads, 1), bias,
                    single_query="sdpa")
    torch.testing.assert_close(got[:3].double(), want[:3], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # as the engine runs it: inference tensors
        got = attention_gqa(q, k, v, bias.clone(), single_query="sdpa")
    torch.testing.assert_close(got[:3].double(), want[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_16_bit_matmuls_read_a_strided_cache_padded_or_row_by_row_to_the_same_answer(kv_heads: int,
                                                                                       monkeypatch) -> None:
    """The "matmul" kernel on a continuous batch's cache (a strided slice, bf16): on copies of the padded
    batch, or row by row over each row's own slots when that saves enough (``RAGGED_MATMUL_MIN_SAVED_BYTES``)."""
    gen = torch.Generator().manual_seed(5)
    ends = [60, 5, 12, 30]
    cache_k = torch.randn(6, kv_heads, 128, 16, generator=gen).bfloat16()
    cache_v = torch.randn(6, kv_heads, 128, 16, generator=gen).bfloat16()
    k, v = cache_k[:4, :, :60], cache_v[:4, :, :60]  # as the engine reads it: not contiguous
    assert not k.is_contiguous()
    q = torch.randn(4, 4, 1, 16, generator=gen).bfloat16()
    bias = _ragged_bias(ends, 60)
    want = _reference(q, k, v, bias)
    calls = []
    matmul = torch.matmul

    def counted(*args, **kwargs):
        calls.append(args[1].shape[-1])  # the keys' slots (scores) or the values' width
        return matmul(*args, **kwargs)

    monkeypatch.setattr(layers.torch, "matmul", counted)
    answers = []
    for min_saved, matmuls in ((16, 8), (1 << 20, 2)):  # row by row, or (too little saved) padded
        monkeypatch.setattr(layers, "RAGGED_MATMUL_MIN_SAVED_BYTES", min_saved)
        calls.clear()
        bias = bias.clone()  # a new forward's bias (one bias is read-only once attended with)
        got = attention_gqa(q, k, v, bias) if kv_heads != 4 else attention(q, k, v, bias)
        torch.testing.assert_close(got.double(), want, atol=0.03, rtol=0.03)
        assert len(calls) == matmuls
        if matmuls == 8:  # each row's scores span its own slots only
            assert calls[0::2] == ends
        answers.append(got)
    torch.testing.assert_close(answers[0], answers[1], atol=0.02, rtol=0.02)


def test_kept_copies_reuse_their_memory_grow_by_half_and_give_each_concurrent_call_its_own() -> None:
    """The 16-bit matmul kernel copies a step's strided keys/values into memory kept between layers/steps."""
    kept = layers._KeptCopies()
    gen = torch.Generator().manual_seed(6)
    cache_k = torch.randn(3, 2, 64, 8, generator=gen).bfloat16()
    cache_v = torch.randn(3, 2, 64, 8, generator=gen).bfloat16()
    q = torch.randn(3, 2, 1, 8, generator=gen).bfloat16()

    def attend(rows: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = cache_k[:rows, :, :slots], cache_v[:rows, :, :slots]
        got = kept.attend(q[:rows], k, v, None)
        torch.testing.assert_close(got.double(), _reference(q[:rows], k, v, None), atol=0.03, rtol=0.03)
        (pair,) = kept.free[(torch.bfloat16, cache_k.device, False)]  # given back
        return pair

    keys, values = attend(3, 20)
    assert keys.numel() == values.numel() == 3 * 2 * 20 * 8 and keys.data_ptr() != values.data_ptr()
    again = attend(2, 10)  # fits: the same memory
    assert again[0].data_ptr() == keys.data_ptr() and again[1].data_ptr() == values.data_ptr()
    grown = attend(3, 21)  # 1008 > 960 elements: half as large again
    assert grown[0].numel() == grown[1].numel() == 960 * 3 // 2
    busy = kept.free[(torch.bfloat16, cache_k.device, False)].pop()  # as if another thread were in a call
    kept.attend(q, cache_k[:, :, :5], cache_v[:, :, :5], None)
    (own,) = kept.free[(torch.bfloat16, cache_k.device, False)]
    assert own[0].data_ptr() not in (busy[0].data_ptr(), busy[1].data_ptr())


def test_the_16_bit_matmul_kernel_runs_in_and_out_of_inference_mode(monkeypatch) -> None:
    """Inference tensors cannot be written outside inference mode: the kept copies are per mode."""
    monkeypatch.setattr(layers, "_KEPT_COPIES", layers._KeptCopies())  # none made before this test
    gen = torch.Generator().manual_seed(7)
    cache_k = torch.randn(4, 4, 64, 16, generator=gen).bfloat16()
    cache_v = torch.randn(4, 4, 64, 16, generator=gen).bfloat16()
    q = torch.randn(3, 4, 1, 16, generator=gen).bfloat16()
    k, v = cache_k[:3, :, :40], cache_v[:3, :, :40]
    want = _reference(q, k, v, None)
    with torch.inference_mode():
        in_mode = attention(q, k, v, None)
    with torch.no_grad():
        out_of_mode = attention(q, k, v, None)
    torch.testing.assert_close(in_mode.double(), want, atol=0.03, rtol=0.03)
    torch.testing.assert_close(out_of_mode, in_mode, atol=0, rtol=0)


def test_inputs_autograd_tracks_are_not_copied_into_the_kept_buffers() -> None:
    """Two layers in a row with a query that needs gradients: each keeps its own keys/values for backward."""
    gen = torch.Generator().manual_seed(8)
    caches = [(torch.randn(2, 4, 32, 16, generator=gen).bfloat16(), torch.randn(2, 4, 32, 16, generator=gen).bfloat16())
              for _ in range(2)]
    q = torch.randn(2, 4, 1, 16, generator=gen).bfloat16().requires_grad_()
    outs = [attention(q, k[:, :, :20], v[:, :, :20], None) for k, v in caches]
    (outs[0].float().sum() + 2 * outs[1].float().sum()).backward()
    q64 = q.detach().double().requires_grad_()
    want = [_reference(q64, k[:, :, :20], v[:, :, :20], None) for k, v in caches]
    (want[0].sum() + 2 * want[1].sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=0.05, rtol=0.05)
