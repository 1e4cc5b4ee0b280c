"""Faster bfloat16 linears on CPUs without native bf16 matrix units.

On CPUs without AVX-512-BF16/AMX, PyTorch's bf16 GEMM runs row by row: a 128-token prefill costs 128
times one decode step. Copying the bf16 weight into a reused fp32 buffer (a fast memory copy, unlike
``.float()``, which pays for fresh pages) and running the fp32 GEMM as ``W @ x.T`` (MKL is much faster in
this orientation for few rows) wins from about 8 rows on; single-row decode steps stay on the bf16 GEMV,
which streams half the bytes. Measured on a 2-core AMD EPYC (AVX2), one 16384x4096 weight:

    rows:                      1       8      128
    bf16 F.linear:           6.5 ms  49 ms  783 ms
    fp32 copy + W @ x.T:    25.5 ms  36 ms  126 ms

Results differ from the bf16 kernel only by rounding (fp32 accumulation, output rounded to bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows (tokens x batch) from which the fp32 path wins; below it the bf16 GEMV is faster.
MIN_ROWS = 8
# Largest weight the shared fp32 buffer takes (bigger ones, e.g. a vocabulary head, keep the bf16 path).
MAX_BUFFER_ELEMENTS = 128 * 1024 * 1024

_buffer: torch.Tensor | None = None


def _fp32_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as fp32 in the shared buffer (valid until the next call)."""
    global _buffer
    if _buffer is None or _buffer.numel() < weight.numel():
        _buffer = torch.empty(weight.numel(), dtype=torch.float32)
    return _buffer[: weight.numel()].view(weight.shape).copy_(weight)


class UpcastLinear(nn.Module):
    """Wraps a bf16 ``nn.Linear``'s parameters (shared, not copied); chooses the kernel per call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        weight = self.weight
        if (rows < MIN_ROWS or torch.is_grad_enabled() or x.dtype != torch.bfloat16
                or weight.dtype != torch.bfloat16 or weight.numel() > MAX_BUFFER_ELEMENTS):
            return F.linear(x, weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).float()
        out = (_fp32_copy(weight) @ flat.t()).t()  # [rows, out]
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(torch.bfloat16).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def cpu_lacks_bf16_matmul() -> bool:
    """True when PyTorch's CPU kernels run without AVX-512 (so no native bf16 GEMM)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return not capability.startswith("AVX512")


def use_upcast_linears(model: nn.Module) -> int:
    """Swap every bf16 CPU ``nn.Linear`` of ``model`` for an ``UpcastLinear``; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                setattr(parent, name, UpcastLinear(child))
                swapped += 1
    return swapped
