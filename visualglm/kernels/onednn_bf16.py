"""bf16 linear on a weight reordered once for oneDNN: the same products as ``F.linear``, streamed faster.

``torch.ops.mkldnn._reorder_linear_weight`` puts a bf16 weight into oneDNN's blocked layout once;
``torch.ops.mkldnn._linear_pointwise`` then multiplies without re-laying it out. Measured on one
16384x4096 weight streamed from DRAM, batch 1 and 8 (``.venv/bin/python -m benchmarks.quant_linear``):

    2-vCPU Intel Xeon (AVX-512 BF16, AMX):  F.linear 24.6 GB/s, reordered 26.5 GB/s (batch 8: the same)
    2-vCPU AMD EPYC Zen 4 (AVX-512 BF16):   F.linear 14.7 GB/s, reordered 20.9 GB/s

The output equals ``F.linear``'s on those machines (bf16 products accumulated in fp32 either way); the
tests bound it by bf16 rounding. The reordered weight replaces the plain one (no extra memory) and is
turned back into it exactly (``to_dense``) for ``state_dict`` and ``dequantize``. A weight that another
module shares (ChatGLM-6B's output layer *is* the embedding matrix) is left alone: reordering it would
need a copy of its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def onednn_bf16_available() -> bool:
    """True when this PyTorch build can reorder and run a bf16 linear through oneDNN on this CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        w = torch.ones(16, 32, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 32, dtype=torch.bfloat16), packed, None, "none",
                                                 [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 32).all())


def _onednn_linear(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


# Run as it is inside a torch.compile'd forward (a graph break): Inductor (torch 2.13) lowers this op only for
# weights it has frozen as constants and fails on the reordered weight of a module ("LoweringException" from
# mkldnn_lowerings.linear_unary), which broke ``visualglm bench --compile`` on CPUs with AVX-512 BF16.
_onednn_linear_outside_graph = torch.compiler.disable(_onednn_linear)


class PackedBF16Linear(nn.Module):
    """A bf16 ``nn.Linear`` whose weight lives in oneDNN's layout (``packed``, an opaque tensor, not a
    parameter); ``bias`` stays a (frozen) parameter. bf16 CPU inputs take the oneDNN kernel; anything else
    (an input that needs a gradient; other dtypes, refused as ``nn.Linear`` refuses them) the plain
    ``F.linear`` on the weight turned back."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(f"expected a bf16 CPU weight, got {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.packed = self._pack(weight.contiguous())
        self.bias = linear.bias

    @staticmethod
    def _pack(weight: torch.Tensor) -> torch.Tensor:
        """The plain bf16 weight ``[out, in]`` in this kernel's layout."""
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def weight_nbytes(self) -> int:
        """Bytes of the reordered weight (not a parameter or buffer, so counted here)."""
        return self.out_features * self.in_features * 2

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The plain weight ``[out, in]`` (exact)."""
        return self.packed.to_dense().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.dequantize(), self.bias)  # what nn.Linear does (and raises) with bf16 weights
        x2d = x.reshape(-1, self.in_features)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        # (eager calls skip the compiler's wrapper)
        linear = _onednn_linear_outside_graph if torch.compiler.is_compiling() else _onednn_linear
        out = linear(x2d, self.packed, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantize()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        names = ["weight"] + (["bias"] if self.bias is not None else [])
        absent = [prefix + name for name in names if prefix + name not in state_dict]
        missing_keys.extend(absent)
        if absent:
            return
        weight = state_dict[prefix + "weight"]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: expected {(self.out_features, self.in_features)}, got "
                              f"{tuple(weight.shape)}")
            return
        self.packed = self._pack(weight.to(torch.bfloat16).contiguous())
        if self.bias is not None:
            self.bias.data.copy_(state_dict[prefix + "bias"])

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        if fn(torch.zeros(1)).device.type != "cpu":
            raise RuntimeError("a model with CPU decode kernels cannot move to another device: load it with "
                               "fast_cpu_kernels=False (or with device=...) instead")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
