"""Weight-only quantized linear layers (W8A16 / W4A16).

``Int8Linear``: int8 weight ``[out, in]`` with one symmetric scale per output row
(``scale = max|W[row]| / 127``, round to nearest), the scheme of THUDM's ChatGLM-6B checkpoints.

``Int4Linear``: 4-bit codes ``q`` in 0..15 with one ``(scale, zero)`` pair per group of ``group_size``
input columns, ``W = (q - 8) * scale + zero`` (the convention of ``torch._weight_int4pack_mm_for_cpu``;
symmetric groups have ``zero = 0``). In memory the codes sit in the tiled layout of this CPU's kernel (see
``visualglm.quant.packing``) so the kernel reads them directly; the module's ``state_dict`` holds them in a
CPU-independent plain layout, so a saved quantized model loads on any machine.

Three ways to run a call, chosen per call:
- few rows on CPU (decoding): PyTorch's weight-only kernels (``torch._weight_int8pack_mm``,
  ``torch._weight_int4pack_mm_for_cpu``), which stream the small weights;
- many rows on CPU (prefill, ``rows >= PREFILL_MIN_ROWS``): the weight is dequantized into one reused scratch
  buffer and the ordinary GEMM runs (bf16 where the CPU has bf16 matrix instructions, fp32 ``W @ x.T``
  otherwise). The weight-only kernels work row by row and lose to a real GEMM once the dequantization is
  spread over enough rows;
- other devices, or a gradient w.r.t. the input (P-tuning on a quantized model): dequantize + ``F.linear``.
Weights are frozen buffers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant.packing import (
    CHUNK_ROWS,
    int4_group_codes,
    kernel_block_n,
    pack_int4_plain,
    pack_int4_tiled,
    quantize_int8_rows,
    unpack_int4_plain,
    unpack_int4_tiled,
    unpack_thudm_int4,
)
from visualglm.quant.portable import PortableState, check_int8_state

Backend = Literal["auto", "kernel", "dequant"]

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
# Rows dequantized at a time: a 256-row fp32 chunk (4 MiB at K=4096) stays in cache between the unpacking
# and the scaling passes; 1024 rows ran 1.1x slower, the former uint8 unpack + re-order 1.5x slower.
DEQUANT_ROWS = 256
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows (tokens x batch) from which dequantize + GEMM beats the weight-only kernel, per bit width; None: never.
# Measured with benchmarks/quant_linear.py (16384x4096 weight) on a 2-core AMD EPYC with AVX-512 BF16: int8
# at 32 rows 20 ms vs 38 ms (kernel), at 128 rows 53 ms vs 146 ms; int4 (dequantizing costs ~30 ms) breaks
# even between 80 and 96 rows: 66 vs 62 ms at 80, 71 vs 75 ms at 96, 78 vs 100 ms at 128, 135 vs 216 ms at
# 256. The int4 threshold needs a bf16 GEMM: without bf16 matrix instructions the fp32 GEMM and the nibble
# unpacking cost more than the kernel saves, so there int4 stays on its kernel.
_INT4_PREFILL_ROWS = 96
_scratch: torch.Tensor | None = None


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


def _native_bf16() -> bool:
    """CPU with bf16 matrix instructions (AVX-512 BF16 or AMX): bf16 GEMM is then faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


_PREFILL_DTYPE = torch.bfloat16 if _native_bf16() else torch.float32
PREFILL_MIN_ROWS: dict[int, int | None] = {8: 32, 4: _INT4_PREFILL_ROWS if _native_bf16() else None}


def _scratch_buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` view of one process-wide buffer, grown to the largest weight seen (valid until the next
    call). Reusing it avoids paying for fresh pages on every prefill call."""
    global _scratch
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    if _scratch is None or _scratch.numel() < nbytes:
        _scratch = torch.empty(nbytes, dtype=torch.uint8)
    return _scratch[:nbytes].view(dtype).view(shape)


def _use_prefill(bits: int, backend: str, x: torch.Tensor) -> bool:
    threshold = PREFILL_MIN_ROWS.get(bits)
    rows = x.numel() // x.shape[-1]
    return (backend == "auto" and threshold is not None and rows >= threshold and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad))


def _gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [rows, in] @ weight [out, in].T`` in ``weight``'s dtype -> ``[rows, out]``."""
    if weight.dtype == torch.float32:
        return (weight @ x.float().t()).t()  # MKL's faster orientation for few rows (see kernels.cpu_bf16)
    return F.linear(x.to(weight.dtype), weight)


def quantized_bits(module: nn.Module) -> int | None:
    """8 or 4 when ``module`` is a weight-only quantized linear: ``Int8Linear``, ``Int4Linear`` or a CPU-kernel
    form of one (``visualglm.quant.onednn_int8``), which keeps their ``state_dict``. None otherwise."""
    bits = getattr(type(module), "quant_bits", None)
    return bits if bits in (4, 8) else None


class Int8Linear(nn.Module):
    """``y = x @ (weight * scale[:, None]).T + bias`` with an int8 weight and per-row scales.

    Buffers: ``weight`` int8 ``[out, in]``, ``scale`` fp32 ``[out]``, optional ``bias`` ``[out]``.
    """

    backend: Backend = "auto"
    quant_bits = 8

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        check_int8_state(weight, scale)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias_dtype: torch.dtype | None = None,
              device: torch.device | str = "meta") -> Int8Linear:
        """Unfilled buffers (meta by default) to assign into while loading; ``bias_dtype`` None: no bias."""
        weight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        scale = torch.empty(out_features, dtype=torch.float32, device=device)
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(weight, scale, bias)

    def quantize_(self, weight: torch.Tensor) -> Int8Linear:
        """Quantize a float ``[out, in]`` weight into this module's buffers (on ``weight``'s device)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        self.weight, self.scale = quantize_int8_rows(weight.detach())
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        weight = linear.weight.detach()
        bias = getattr(linear, "bias", None)
        module = cls.empty(*weight.shape, None if bias is None else bias.dtype, device=weight.device)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module.quantize_(weight)

    @classmethod
    def from_thudm(cls, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> Int8Linear:
        """THUDM ChatGLM-6B int8 checkpoint tensors: ``weight`` int8 [out, in], ``weight_scale`` fp16 [out]."""
        return cls(weight_int8.to(torch.int8), weight_scale, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_prefill(8, self.backend, x):
            x2d = x.reshape(-1, self.in_features)
            # int8 values are exact in bf16 and fp32, and the per-row scale factors out of the sum: only
            # the int8 -> float copy is paid per call, the scale goes on the (much smaller) output.
            w = _scratch_buffer((self.out_features, self.in_features), _PREFILL_DTYPE).copy_(self.weight)
            out = _gemm(x2d, w) * self.scale.to(w.dtype)
            if self.bias is not None:
                out = out + self.bias.to(w.dtype)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
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


def _layout_block() -> int:
    """Tiled-layout block for new Int4Linear buffers: the kernel's, or 64 where there is no usable kernel."""
    return kernel_block_n() or 64


def check_int4_state(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int,
                     group_size: int) -> None:
    """Raise ValueError unless the tensors are ``Int4Linear``'s portable form: plain uint8 ``qweight``
    ``[out, in/2]`` and float ``scales_and_zeros`` ``[in/group, out, 2]``."""
    n, k, g = out_features, in_features, group_size
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (n, k // 2):
        raise ValueError(f"qweight must be uint8 {(n, k // 2)}, got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(scales_and_zeros.shape) != (k // g, n, 2) or not scales_and_zeros.is_floating_point():
        raise ValueError(f"scales_and_zeros must be float {(k // g, n, 2)}, got {scales_and_zeros.dtype} "
                         f"{tuple(scales_and_zeros.shape)}")


class Int4Linear(PortableState, nn.Module):
    """Group-wise 4-bit weight: ``W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]``.

    Buffers: ``qweight`` uint8 ``[N_pad, K/2]`` (tiled layout with ``block_n`` rows per block, rows padded to
    a multiple of ``block_n``), ``scales_and_zeros`` bf16 ``[K/g, N_pad, 2]`` (what the CPU kernel takes),
    optional ``bias``. ``state_dict`` entries: ``qweight`` uint8 ``[N, K/2]`` in the plain layout and
    ``scales_and_zeros`` ``[K/g, N, 2]`` (no padding), ``bias``.
    """

    backend: Backend = "auto"
    quant_bits = 4
    portable_keys = ("qweight", "scales_and_zeros")  # the state_dict: portable_state()

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int,
                 bias: torch.Tensor | None = None, block_n: int | None = None) -> None:
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        self.group_size = group_size
        self.out_features = out_features
        self.in_features = qweight.shape[1] * 2
        self.block_n = block_n or _layout_block()
        if qweight.shape[0] % self.block_n or qweight.shape[0] < out_features:
            raise ValueError(f"qweight rows {qweight.shape[0]} must cover {out_features} rows in blocks of "
                             f"{self.block_n}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def padded_rows(self) -> int:
        return -(-self.out_features // self.block_n) * self.block_n

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
    def empty(cls, out_features: int, in_features: int, group_size: int, bias_dtype: torch.dtype | None = None,
              device: torch.device | str = "meta") -> Int4Linear:
        """Unfilled buffers (meta by default) to assign into while loading; ``bias_dtype`` None: no bias."""
        block_n = _layout_block()
        n_pad = -(-out_features // block_n) * block_n
        qweight = torch.empty(n_pad, in_features // 2, dtype=torch.uint8, device=device)
        sz = torch.empty(in_features // group_size, n_pad, 2, dtype=torch.bfloat16, device=device)
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(qweight, sz, group_size, out_features, bias, block_n)

    def _fill(self, rows: int, codes_and_params, device: torch.device) -> None:
        """Allocate real buffers on ``device`` and fill them chunk by chunk from ``codes_and_params(start,
        stop)``, which returns (uint8 codes ``[n, K]``, scale ``[n, K/g]``, zero ``[n, K/g]``) for those rows."""
        n_pad, k, g = self.padded_rows, self.in_features, self.group_size
        qweight = torch.empty(n_pad, k // 2, dtype=torch.uint8, device=device)
        sz = torch.zeros(k // g, n_pad, 2, dtype=torch.bfloat16, device=device)
        for start in range(0, n_pad, CHUNK_ROWS):  # CHUNK_ROWS is a multiple of every block size
            stop = min(start + CHUNK_ROWS, n_pad)
            real = max(0, min(stop, rows) - start)
            codes = torch.full((stop - start, k), 8, dtype=torch.uint8, device=device)  # padding rows: 0.0
            if real:
                c, scale, zero = codes_and_params(start, start + real)
                codes[:real] = c
                sz[:, start:start + real, 0] = scale.t()
                sz[:, start:start + real, 1] = zero.t()
            qweight[start:stop] = self._pack_codes(codes)
        self.qweight, self.scales_and_zeros = qweight, sz

    # The in-memory layout of ``qweight`` (rows are packed ``block_n`` at a time, so chunks of CHUNK_ROWS
    # pack independently). Subclasses for other kernels override these two (``visualglm.quant.cuda_kernels``).
    def _pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[n, K]`` (n a multiple of ``block_n``) -> packed uint8 ``[n, K/2]``."""
        return pack_int4_tiled(codes, self.block_n)

    def _unpack_codes(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_pack_codes``."""
        return unpack_int4_tiled(packed, self.block_n)

    @classmethod
    def _from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None) -> Int4Linear:
        """codes int ``[N, K]`` in 0..15; scale, zero float ``[N, K/g]`` (rounded to bf16)."""
        n, k = codes.shape
        module = cls.empty(n, k, group_size, None if bias is None else bias.dtype, device=codes.device)
        if bias is not None:
            module.bias = bias.detach().clone()
        module._fill(n, lambda a, b: (codes[a:b].to(torch.uint8), scale[a:b], zero[a:b]), codes.device)
        return module

    def quantize_(self, weight: torch.Tensor, symmetric: bool = False) -> Int4Linear:
        """Round-to-nearest group quantization of a float ``[out, in]`` weight into this module's buffers
        (see ``visualglm.quant.packing.int4_group_codes`` for the rule)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        weight = weight.detach()
        self._fill(self.out_features,
                   lambda a, b: int4_group_codes(weight[a:b].float(), self.group_size, symmetric), weight.device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 128, symmetric: bool = False) -> Int4Linear:
        """Round-to-nearest group quantization. Symmetric: ``scale = max|w| / 7``, codes ``q - 8`` in -7..7,
        ``zero = 0``. Asymmetric: ``scale = (max - min) / 15``, ``zero = min + 8 * scale`` (bf16-rounded)."""
        weight = linear.weight.detach()
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
        bias = getattr(linear, "bias", None)
        module = cls.empty(n, k, group_size, None if bias is None else bias.dtype, device=weight.device)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module.quantize_(weight, symmetric)

    @classmethod
    def from_thudm(cls, weight_int8_packed: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, group_size: int | None = None) -> Int4Linear:
        """THUDM chatglm-6b-int4 tensors: ``weight`` int8 [out, in/2] (see ``unpack_thudm_int4``) and
        ``weight_scale`` fp16 [out] (per channel; repeated over the groups). Exact up to bf16 scales."""
        n, k = weight_int8_packed.shape[0], weight_int8_packed.shape[1] * 2
        g = group_size or cls.pick_group_size(k, 256)
        if g is None or k % g:
            raise ValueError(f"in_features {k} has no int4 group size")
        module = cls.empty(n, k, g, None if bias is None else bias.dtype, device=weight_int8_packed.device)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module.load_thudm_(weight_int8_packed, weight_scale)

    def load_thudm_(self, weight_int8_packed: torch.Tensor, weight_scale: torch.Tensor) -> Int4Linear:
        """Fill from THUDM's int4 tensors (int8 ``[N, K/2]`` packed, fp16 ``[N]`` per-row scale): the row's
        scale becomes every group's scale, codes are THUDM's values + 8, zeros are 0."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if weight_int8_packed.dtype not in (torch.int8, torch.uint8) or tuple(weight_int8_packed.shape) != (n, k // 2):
            raise ValueError(f"weight must be int8 {(n, k // 2)} (two 4-bit values a byte), got "
                             f"{weight_int8_packed.dtype} {tuple(weight_int8_packed.shape)}")
        if tuple(weight_scale.shape) != (n,) or not weight_scale.is_floating_point():
            raise ValueError(f"weight_scale must be float [{n}], got {weight_scale.dtype} {tuple(weight_scale.shape)}")
        scale = weight_scale.float()

        def rows(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            codes = (unpack_thudm_int4(weight_int8_packed[a:b]).to(torch.int16) + 8).to(torch.uint8)
            s = scale[a:b, None].expand(b - a, k // g)
            return codes, s, torch.zeros_like(s)

        self._fill(n, rows, weight_int8_packed.device)
        return self

    def load_portable_(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor) -> Int4Linear:
        """Fill from the ``state_dict`` layout: plain uint8 ``[N, K/2]``, bf16 ``[K/g, N, 2]``."""
        n = self.out_features
        check_int4_state(qweight, scales_and_zeros, n, self.in_features, self.group_size)
        sz = scales_and_zeros.to(torch.bfloat16)
        self._fill(n, lambda a, b: (unpack_int4_plain(qweight[a:b]), sz[:, a:b, 0].t(), sz[:, a:b, 1].t()),
                   qweight.device)
        return self

    def portable_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain uint8 ``[N, K/2]``, bf16 ``[K/g, N, 2]``): the CPU-independent form of the weights."""
        n = self.out_features
        plain = torch.empty(n, self.in_features // 2, dtype=torch.uint8, device=self.qweight.device)
        for start in range(0, self.padded_rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, self.padded_rows)
            codes = self._unpack_codes(self.qweight[start:stop])
            if start < n:
                plain[start:min(stop, n)] = pack_int4_plain(codes[: min(stop, n) - start])
        return plain, self.scales_and_zeros[:, :n].contiguous()

    def codes(self) -> torch.Tensor:
        """uint8 codes 0..15, ``[out, in]``."""
        return self._unpack_codes(self.qweight)[: self.out_features]

    def _dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the ``[N_pad, K]`` weight into ``out`` (any float dtype) in row chunks, computing in fp32."""
        k, g, block = self.in_features, self.group_size, self.block_n
        half = block // 2
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [N_pad, K/g, 2]
        rows = min(DEQUANT_ROWS, self.padded_rows)
        scratch = torch.empty(rows, k, dtype=torch.float32, device=self.qweight.device)
        for start in range(0, self.padded_rows, rows):
            stop = min(start + rows, self.padded_rows)
            n = stop - start
            # Tiled layout: byte [k, d] of a block holds row d (low nibble) and row d + half (high nibble).
            # Unpacking straight into the fp32 chunk saves the uint8 intermediate and its re-ordering copy.
            tiles = self.qweight[start:stop].view(n // block, k, half).transpose(1, 2)  # [blocks, half, K]
            q = scratch[:n]
            halves = q.view(n // block, 2, half, k)
            halves[:, 0].copy_(tiles & 15)
            halves[:, 1].copy_(tiles >> 4)
            part = sz[start:stop]
            # (q - 8) * scale + zero == q * scale + (zero - 8 * scale): two in-place passes over the chunk.
            q.view(n, k // g, g).mul_(part[..., :1]).add_(part[..., 1:] - 8 * part[..., :1])
            out[start:stop].copy_(q)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(self.padded_rows, self.in_features, dtype=dtype, device=self.qweight.device)
        return self._dequantize_into(out)[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_prefill(4, self.backend, x):
            x2d = x.reshape(-1, self.in_features)
            w = self._dequantize_into(_scratch_buffer((self.padded_rows, self.in_features), _PREFILL_DTYPE))
            out = _gemm(x2d, w[: self.out_features])
            if self.bias is not None:
                out = out + self.bias.to(w.dtype)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if _use_kernel(self.backend, kernel_block_n() == self.block_n, x):
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


__all__ = ["INT4_GROUP_SIZES", "Int4Linear", "Int8Linear", "pack_int4_plain", "pack_int4_tiled",
           "unpack_int4_plain", "unpack_int4_tiled", "unpack_thudm_int4"]
