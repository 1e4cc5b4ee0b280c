"""The optional compiled decode-step attention (``visualglm.kernels.strided_attention``): each build the CPU
runs (AVX-512F, AVX2) is built here when a compiler is found, checked against float64 attention on strided
cache slices, and through the continuous-batching engine (every request answers as alone)."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visualglm.checkpoint.cpu_kernels import KernelPlan, apply_cpu_kernels
from visualglm.generation.continuous import ContinuousEngine, EngineRequest
from visualglm.generation.engine import GenerationParams
from visualglm.kernels import native, strided_attention
from visualglm.models.layers import MASK_FILL, attention, attention_gqa

from ..conftest import random_chatglm
from ..generation.test_continuous import GMASK, GREEDY, SOP, _alone, _run


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def kernel(request, tmp_path_factory):
    """Each build of the kernel this CPU runs, built into a fresh folder and the one ``attend`` uses."""
    extension = {"avx512": native.ATTENTION, "avx2": native.ATTENTION_AVX2}[request.param]
    if not extension.cpu_supported():
        pytest.skip(f"this CPU lacks {sorted(extension.missing_flags())}: the {request.param} build cannot run here")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the kernel")
    patch = pytest.MonkeyPatch()
    patch.setenv(native.ENV_DIR, str(Path(tmp_path_factory.mktemp("kernels"))))
    try:
        extension.build()
        module = extension.import_built()
        assert module is not None
        patch.setattr(native, "load_attention", lambda: module)
        assert strided_attention.available()
        yield module
    finally:
        patch.undo()


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 attention, q ``[B, G, R, D]`` against k/v ``[B, G, S, D]``."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=None if bias is None else bias.double(),
                                          scale=1.0 / math.sqrt(q.shape[-1]))


def _cache_slice(rows: int, groups: int, slots: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as a continuous batch reads them: a slice of a larger cache (not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(rows + 2, groups, slots + 30, dim, generator=gen).bfloat16()[:rows, :, :slots]
    v = torch.randn(rows + 2, groups, slots + 30, dim, generator=gen).bfloat16()[:rows, :, :slots]
    assert not k.is_contiguous()
    return k, v


def _bias(visible: list[tuple[int, int]], slots: int) -> torch.Tensor:
    """Each row sees slots ``[start, end)`` (left padding before, a shorter row's tail after)."""
    bias = torch.full((len(visible), 1, 1, slots), MASK_FILL)
    for row, (start, end) in enumerate(visible):
        bias[row, ..., start:end] = 0.0
    return bias


@pytest.mark.parametrize(("groups", "queries", "dim"), [(4, 1, 64), (2, 4, 128), (3, 1, 16)])
def test_attends_like_float64_over_strided_slices_skipping_blocked_slots(kernel, groups, queries, dim) -> None:
    k, v = _cache_slice(4, groups, 70, dim, seed=dim + queries)
    q = torch.randn(4, groups, queries, dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    for bias in (None, _bias([(0, 70), (0, 5), (3, 33), (10, 12)], 70)):
        got = strided_attention.attend(q, k, v, bias)
        assert got.dtype == torch.bfloat16 and got.shape == q.shape
        # fp32 scores and weights, then one rounding to bf16 (outputs are ~N(0, 1/sqrt(visible slots)))
        torch.testing.assert_close(got.double(), _reference(q, k, v, bias), atol=8e-3, rtol=8e-3)


def test_a_row_with_every_slot_blocked_comes_out_as_zeros(kernel) -> None:
    k, v = _cache_slice(2, 2, 20, 32, seed=3)
    q = torch.randn(2, 2, 1, 32).bfloat16()
    bias = _bias([(0, 20), (0, 0)], 20)
    got = strided_attention.attend(q, k, v, bias)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[:1].double(), _reference(q[:1], k[:1], v[:1], bias[:1]), atol=8e-3, rtol=8e-3)


def test_declines_inputs_that_are_not_its_own(kernel) -> None:
    k, v = _cache_slice(2, 2, 20, 32, seed=4)
    q = torch.randn(2, 2, 1, 32).bfloat16()
    assert strided_attention.attend(q.float(), k.float(), v.float(), None) is None  # fp32
    assert strided_attention.attend(q.clone().requires_grad_(), k, v, None) is None  # autograd
    assert strided_attention.attend(q, k, v, torch.zeros(2, 1, 3, 20)) is None  # not one bias row per batch row
    k40, v40 = _cache_slice(2, 2, 20, 40, seed=5)
    assert strided_attention.attend(torch.randn(2, 2, 1, 40).bfloat16(), k40, v40, None) is None  # head_dim 40
    # the attention functions fall back to their two matmuls then: the same answer as without a kernel
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.equal(attention(q32, k32, v32, None, strided_attention.attend), attention(q32, k32, v32, None))


def test_grouped_heads_fold_into_query_rows(kernel) -> None:
    k, v = _cache_slice(3, 2, 40, 64, seed=6)
    q = torch.randn(3, 8, 1, 64).bfloat16()  # 4 heads per key/value head
    bias = _bias([(0, 40), (0, 9), (2, 30)], 40)
    got = attention_gqa(q, k, v, bias, single_query=strided_attention.attend)
    want = _reference(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), bias)
    torch.testing.assert_close(got.double(), want, atol=8e-3, rtol=8e-3)


def test_requests_through_the_engine_answer_as_alone_on_the_kernel(kernel) -> None:
    """A bf16 ChatGLM on the kernel (every decode step's attention taken by it, none declined): requests
    arriving at random steps answer as they do alone."""
    model = random_chatglm(tie_word_embeddings=False, seed=3).to(torch.bfloat16)
    apply_cpu_kernels(model, plan=KernelPlan("plain", "plain", 3, "native"))
    assert {module.single_query for module in model.attention_modules()} == {strided_attention.attend}
    taken = []

    def counted(q, k, v, bias):
        out = strided_attention.attend(q, k, v, bias)
        taken.append(out is not None)
        return out

    for module in model.attention_modules():
        module.single_query = counted
    rng = random.Random(0)
    requests = [EngineRequest(i, [rng.randrange(10, 900) for _ in range(rng.randrange(1, 40))] + [GMASK, SOP],
                              GenerationParams(max_new_tokens=rng.randrange(4, 14), sampling=GREEDY))
                for i in range(10)]
    tokens, _ = _run(ContinuousEngine(model, max_rows=4, context=96, prefill_chunk=10), requests, rng)
    for request in requests:
        assert tokens[request.id] == _alone(model, request), request.id
    assert taken and all(taken)
