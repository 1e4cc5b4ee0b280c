"""A decode step's attention over a continuous batch's cached keys/values, read where they lie, on the
optional compiled kernel (``visualglm/kernels/native/strided_attention.cpp``, AVX-512F or AVX2).

A decode step attends over ``cache[:rows, :, :longest]``, a strided view. PyTorch's 16-bit batched matmul
takes a slow path on such views, so its "matmul" kernel copies them first (``layers._KeptCopies``): the keys
and values are then read, written and read again. The compiled kernel reads each visible slot once, skips
the slots a row's bias blocks (the padding of rows shorter than the longest), and accumulates in fp32 (the
matmul path rounds scores and weights to bf16). 2-vCPU Zen 4 EPYC, one layer's attention, bf16:

==============================================  ============  ============
rows x heads x head_dim, cached tokens           copies (ms)   this (ms)
==============================================  ============  ============
8 x 32 x 128, 1,000 (ChatGLM-6B's heads)         19.0          5.2
1 x 32 x 128, 1,000                              1.38          0.58
8 x 16 x 64, 600 (the 151M benchmark model)      1.85          1.01
==============================================  ============  ============

With many query rows per key/value head (GLM-4V's grouped keys: 16 per group) it is slower than the
copies (1.76 against 1.06 ms, 8 rows x 2 groups x 16 x 128, 1,000 tokens): it is given to models whose heads
have their own keys and values only (``visualglm.checkpoint.cpu_kernels``).
"""

from __future__ import annotations

import math

import torch

from visualglm.kernels import native


def available() -> bool:
    """True when the kernel is built for this PyTorch and this CPU runs it."""
    return native.load_attention() is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Attention of q ``[B, G, R, D]`` (R query rows per key/value head) over k/v ``[B, G, S, D]`` (any
    batch/head/slot strides), bias None or ``[B, 1, 1, S]`` additive (a slot whose bias is -5000 or less, as
    ``layers.MASK_FILL``'s -10000, is blocked: the kernel does not read it)
    -> ``[B, G, R, D]`` in v's dtype; the softmax in fp32, scale 1/sqrt(D).

    Returns None when the inputs are not the kernel's (not bf16, tracked by autograd, another bias shape,
    a head_dim that is not a multiple of 16 up to 256, the kernel not built, or inside a torch.compile'd
    forward): the caller's own kernel runs then. A row whose slots are all blocked (a free slot of the
    batch) comes out as zeros."""
    if torch.compiler.is_compiling():  # a compiled decode step keeps the traceable matmuls (no graph break)
        return None
    kernel = native.load_attention()
    dim = q.shape[-1]
    if (kernel is None or not q.dtype == k.dtype == v.dtype == torch.bfloat16 or dim % 16 or dim > 256
            or q.requires_grad or k.requires_grad or v.requires_grad or k.stride(-1) != 1 or v.stride(-1) != 1):
        return None
    rows_bias = None
    if bias is not None:
        if bias.dim() != 4 or bias.shape[:3] != (k.shape[0], 1, 1) or bias.shape[-1] != k.shape[2]:
            return None
        rows_bias = bias.reshape(k.shape[0], k.shape[2]).float().contiguous()
    scores = kernel.scores(q.contiguous(), k, rows_bias, 1.0 / math.sqrt(dim))
    return kernel.weighted_values(scores.softmax(dim=-1), v, rows_bias).to(v.dtype)
