"""Weight-only quantized linear layers (W8A16 / W4A16).

``Int8Linear``: int8 weight ``[out, in]`` with one symmetric scale per output row
(``scale = max|W[row]| / 127``, round to nearest), the scheme of THUDM's ChatGLM-6B checkpoints.

``Int4Linear``: 4-bit codes ``q`` in 0..15 with one ``(scale, zero)`` pair per group of ``group_size``
input columns, ``W = (q - 8) * scale + zero`` (the convention of ``torch._weight_int4pack_mm_for_cpu``;
symmetric groups have ``zero = 0``). Codes are stored in the tiled nibble layout that
``torch._convert_weight_to_int4pack_for_cpu`` produces (uint8 ``[out, in/2]``, see ``pack_int4_tiled``), so the
CPU kernel can use the stored tensor directly; ``unpack_int4_tiled`` reads the same layout in plain PyTorch,
which gives a dequantize path on any device.

On CPU the aten weight-only kernels are used (they need bf16 activations to be fast, so activations are
cast to bf16 and the result back to the input dtype); otherwise, or when a gradient w.r.t. the input is
needed (P-tuning on a quantized model), the weight is dequantized to the activation dtype and ``F.linear``
runs. Weights are frozen buffers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Backend = Literal["auto", "kernel", "dequant"]

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch, "_convert_weight_to_int4pack_for_cpu"
)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# The tiled int4 layout interleaves blocks of this many output rows (16 in the low nibble, 16 in the high).
_INT4_BLOCK_N = 32


def _use_kernel(backend: str, available: bool, x: torch.Tensor) -> bool:
    if backend == "dequant":
        return False
    ok = available and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
    if backend == "kernel" and not ok:
        raise RuntimeError("weight-only kernel unavailable for this call (needs CPU, no input grad)")
    return ok


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16 runs natively; fp32 and everything else is 10-50x faster through bf16.
    return torch.float16 if x.dtype == torch.float16 else torch.bfloat16


class Int8Linear(nn.Module):
    """``y = x @ (weight * scale[:, None]).T + bias`` with an int8 weight and per-row scales."""

    backend: Backend = "auto"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.ndim != 2 or scale.shape != weight.shape[:1]:
            raise ValueError(f"expected int8 [out, in] weight and [out] scale, got {weight.shape} {scale.shape}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = getattr(linear, "bias", None)
        return cls(q, scale, None if bias is None else bias.detach())

    @classmethod
    def from_thudm(cls, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> Int8Linear:
        """THUDM ChatGLM-6B int8 checkpoint tensors: ``weight`` int8 [out, in], ``weight_scale`` fp16 [out]."""
        return cls(weight_int8.to(torch.int8), weight_scale, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernel(self.backend, _HAS_INT8_KERNEL, x):
            kd = _kernel_dtype(x)
            x2d = x.reshape(-1, self.in_features).to(kd).contiguous()
            out = torch._weight_int8pack_mm(x2d, self.weight, self.scale.to(kd))
            if self.bias is not None:
                out = out + self.bias.to(kd)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_int4_tiled(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 ``[N, K]`` (N % 32 == 0, K even) -> uint8 ``[N, K/2]`` in the CPU int4 kernel layout.

    The layout (that of ``torch._convert_weight_to_int4pack_for_cpu`` in torch 2.13, checked by the tests):
    for each block of 32 rows, bytes run over k then over 16 rows n; the low nibble holds row ``n``, the high
    nibble row ``n + 16``.
    """
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n // _INT4_BLOCK_N, 2, 16, k)
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # [B, 16, K]
    return packed.transpose(1, 2).contiguous().reshape(n, k // 2)


def unpack_int4_tiled(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_tiled``: uint8 ``[N, K/2]`` -> uint8 codes ``[N, K]``."""
    n, half = packed.shape
    k = half * 2
    tiles = packed.reshape(n // _INT4_BLOCK_N, k, 16).transpose(1, 2)  # [B, 16, K]
    return torch.stack([tiles & 15, tiles >> 4], dim=1).reshape(n, k)


def unpack_thudm_int4(packed: torch.Tensor) -> torch.Tensor:
    """THUDM int4 packing (int8 ``[out, in/2]``, element 2j in the high nibble, 2j+1 in the low, both signed
    4-bit two's complement) -> int8 values ``[out, in]`` in -8..7."""
    p = packed.to(torch.int8)
    high = p >> 4  # arithmetic shift keeps the sign
    low = (p << 4) >> 4  # int8 shift left wraps, then sign-extends
    return torch.stack([high, low], dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    if _HAS_INT4_KERNEL and codes.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return pack_int4_tiled(codes)


class Int4Linear(nn.Module):
    """Group-wise 4-bit weight: ``W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]``.

    Buffers: ``qweight`` uint8 ``[N_pad, K/2]`` (tiled layout, rows padded to a multiple of 32),
    ``scales_and_zeros`` bf16 ``[K/g, N_pad, 2]`` (what the CPU kernel takes), optional ``bias``.
    """

    backend: Backend = "auto"

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        self.group_size = group_size
        self.out_features = out_features
        self.in_features = qweight.shape[1] * 2
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @staticmethod
    def pick_group_size(in_features: int, preferred: int = 128) -> int | None:
        """``preferred`` if it divides ``in_features``, else the largest kernel group size that does."""
        if in_features % preferred == 0 and preferred in INT4_GROUP_SIZES:
            return preferred
        for g in sorted(INT4_GROUP_SIZES, reverse=True):
            if in_features % g == 0:
                return g
        return None

    @classmethod
    def _from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None) -> Int4Linear:
        """codes int [N, K] in 0..15; scale, zero float [N, K/g]."""
        n = codes.shape[0]
        pad = (-n) % _INT4_BLOCK_N
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scale = F.pad(scale, (0, 0, 0, pad))
            zero = F.pad(zero, (0, 0, 0, pad))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/g, N_pad, 2]
        return cls(_pack_codes(codes), sz, group_size, n, bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 128, symmetric: bool = False) -> Int4Linear:
        """Round-to-nearest group quantization. Symmetric: ``scale = max|w| / 7``, codes ``q - 8`` in -7..7,
        ``zero = 0``. Asymmetric: ``scale = (max - min) / 15``, ``zero = min + 8 * scale`` (bf16-rounded)."""
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
        wg = w.reshape(n, k // group_size, group_size)
        if symmetric:
            scale = (wg.abs().amax(dim=-1) / 7.0).to(torch.bfloat16).float()
            zero = torch.zeros_like(scale)
        else:
            lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
            scale = ((hi - lo) / 15.0).to(torch.bfloat16).float()
            zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((wg - zero[..., None]) / safe[..., None]) + 8
        codes = codes.clamp_(0, 15).reshape(n, k).to(torch.int32)
        bias = getattr(linear, "bias", None)
        return cls._from_codes(codes, scale, zero, group_size, None if bias is None else bias.detach())

    @classmethod
    def from_thudm(cls, weight_int8_packed: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, group_size: int | None = None) -> Int4Linear:
        """THUDM chatglm-6b-int4 tensors: ``weight`` int8 [out, in/2] (see ``unpack_thudm_int4``) and
        ``weight_scale`` fp16 [out] (per channel; repeated over the groups). Exact up to bf16 scales."""
        values = unpack_thudm_int4(weight_int8_packed)
        n, k = values.shape
        g = group_size or cls.pick_group_size(k, 256)
        if g is None or k % g:
            raise ValueError(f"in_features {k} has no int4 group size")
        scale = weight_scale.float()[:, None].expand(n, k // g).contiguous()
        return cls._from_codes(values.to(torch.int32) + 8, scale, torch.zeros_like(scale), g, bias)

    def codes(self) -> torch.Tensor:
        """uint8 codes 0..15, ``[out, in]``."""
        return unpack_int4_tiled(self.qweight)[: self.out_features]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4_tiled(self.qweight).to(torch.float32)  # [N_pad, K]
        n_pad, k = q.shape
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [N_pad, K/g, 2]
        w = (q.reshape(n_pad, k // self.group_size, self.group_size) - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(n_pad, k)[: self.out_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernel(self.backend, _HAS_INT4_KERNEL, x):
            kd = _kernel_dtype(x)
            x2d = x.reshape(-1, self.in_features).to(kd).contiguous()
            out = torch._weight_int4pack_mm_for_cpu(x2d, self.qweight, self.group_size,
                                                    self.scales_and_zeros.to(kd))
            out = out[:, : self.out_features]
            if self.bias is not None:
                out = out + self.bias.to(kd)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        w = self.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
