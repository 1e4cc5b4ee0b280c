"""INT4 (group-wise) and INT8 linears on the optional AMX kernels (``visualglm.kernels.native``, built on
request).

``AmxInt4Linear`` holds ``Int4Linear``'s values (``W = (code - 8) * scale + zero`` per group of inputs) with
its codes re-laid for AMX tiles (the same bytes: 4 bits a weight) and the portable bf16
``scales_and_zeros`` ``[K/g, N, 2]``. Every call, one row or a prefill's hundreds, runs the AMX kernel: the
activations split into three int8 planes, int32 sums per group, the weight-only result to fp32 rounding.
Its ``state_dict`` is ``Int4Linear``'s portable form, so checkpoints saved from either are the same.
``AmxInt8Linear`` does the same for ``Int8Linear`` (int8 weight, a scale per output).
Measured figures: ``benchmarks/quant_linear.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.kernels import native
from visualglm.kernels.amx_tiles import TILE_OUTPUTS, pack_vnni_tiles, tile_inputs, unpack_vnni_tiles
from visualglm.quant.linear import Int4Linear, Int8Linear, check_int4_state
from visualglm.quant.packing import pack_int4_plain, unpack_int4_plain
from visualglm.quant.portable import PortableInt8State, PortableState, check_int8_state

PLANES = 3
CHUNK = tile_inputs(torch.int8)  # inputs per AMX tile of int8 weights or 4-bit codes (64)


def fits(module: Int4Linear) -> bool:
    """Shapes the kernel takes: outputs a multiple of 16, groups a multiple of 64 inputs, on the CPU."""
    return (module.out_features % TILE_OUTPUTS == 0 and module.group_size % CHUNK == 0
            and module.in_features % module.group_size == 0 and module.qweight.device.type == "cpu")


def pack_tiles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` -> the kernel's layout ``[N/16, K/64, 16, 32]``: ``pack_vnni_tiles``'s tiles of
    16 outputs x 64 inputs (row j holds inputs 4j..4j+3 of each output side by side, 64 columns), column c in
    the low nibble of byte c and column c + 32 in its high nibble."""
    tiles = pack_vnni_tiles(codes)
    return (tiles[..., :32] | (tiles[..., 32:] << 4)).contiguous()


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_tiles``: ``[N/16, K/64, 16, 32]`` -> uint8 codes ``[N, K]``."""
    return unpack_vnni_tiles(torch.cat([packed & 15, packed >> 4], dim=-1))


def int8_fits(module: Int8Linear) -> bool:
    """Shapes the INT8 kernel takes: outputs a multiple of 16, inputs of 64, on the CPU."""
    return (module.out_features % TILE_OUTPUTS == 0 and module.in_features % CHUNK == 0
            and module.weight.device.type == "cpu")


class AmxInt8Linear(PortableInt8State, nn.Module):
    """INT8 linear (``Int8Linear``'s values: int8 weight, fp32 scale per output) on AMX tiles: every call runs
    the kernel with three exact activation planes. Buffers: ``packed`` int8 ``[N/16, K/64, 16, 64]``,
    ``scale``, optional ``bias``; the state_dict is ``Int8Linear``'s. CPU only."""

    quant_bits = 8

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        check_int8_state(weight, scale)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack_vnni_tiles(weight))
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_int8(cls, module: Int8Linear) -> AmxInt8Linear:
        return cls(module.weight, module.scale, module.bias)

    def int8_weight(self) -> torch.Tensor:
        return unpack_vnni_tiles(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.int8_weight().float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = native.load()
        if kernel is None or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        out = kernel.int8_linear(x.reshape(-1, self.in_features), self.packed, self.scale, PLANES)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _set_int8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self.packed = pack_vnni_tiles(weight)
        self.scale = scale.contiguous()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        return _cpu_only_apply(self, fn, recurse, "scale")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _cpu_only_apply(module: nn.Module, fn, recurse: bool, keep: str) -> nn.Module:  # type: ignore[no-untyped-def]
    """``nn.Module._apply`` for a CPU-kernel module: a move to another device is refused with a message, and a
    dtype cast (``model.half()``) leaves the ``keep`` buffer (the quantization scales) as it is."""
    if fn(torch.zeros(1)).device.type != "cpu":
        raise RuntimeError("a model with CPU decode kernels cannot move to another device: load it with "
                           "fast_cpu_kernels=False (or with device=...) instead")
    kept = getattr(module, keep)
    nn.Module._apply(module, fn, recurse)
    setattr(module, keep, kept)
    return module


class AmxInt4Linear(PortableState, nn.Module):
    """INT4 linear on AMX tiles (see the module docstring). Buffers: ``packed`` uint8 ``[N/16, K/64, 16, 32]``,
    ``scales_and_zeros`` bf16 ``[K/g, N, 2]``, optional ``bias``. CPU only."""

    quant_bits = 4
    portable_keys = ("qweight", "scales_and_zeros")

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        expected = (self.in_features // group_size, self.out_features, 2)
        if tuple(scales_and_zeros.shape) != expected:
            raise ValueError(f"expected scales_and_zeros {expected}, got {tuple(scales_and_zeros.shape)}")
        self.register_buffer("packed", pack_tiles(codes.to(torch.uint8)))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_int4(cls, module: Int4Linear) -> AmxInt4Linear:
        qweight, scales_and_zeros = module.portable_state()
        return cls(unpack_int4_plain(qweight), scales_and_zeros, module.group_size, module.bias)

    def codes(self) -> torch.Tensor:
        """uint8 codes 0..15, ``[out, in]``."""
        return unpack_tiles(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_size
        sz = self.scales_and_zeros.float()
        scale = sz[..., 0].t().repeat_interleave(g, dim=1)
        zero = sz[..., 1].t().repeat_interleave(g, dim=1)
        return ((self.codes().float() - 8) * scale + zero).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = native.load()
        if kernel is None or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            # no kernel (moved away, or an input that needs a gradient): plain autograd on the weight
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        out = kernel.int4_linear(x.reshape(-1, self.in_features), self.packed, self.scales_and_zeros,
                                 self.group_size, PLANES)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # --- Int4Linear's portable state_dict (PortableState), and no silent moves ----------------------
    def portable_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_int4_plain(self.codes()), self.scales_and_zeros

    def load_portable_(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor) -> AmxInt4Linear:
        check_int4_state(qweight, scales_and_zeros, self.out_features, self.in_features, self.group_size)
        self.packed = pack_tiles(unpack_int4_plain(qweight))
        self.scales_and_zeros = scales_and_zeros.to(torch.bfloat16).contiguous()
        return self

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        return _cpu_only_apply(self, fn, recurse, "scales_and_zeros")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
