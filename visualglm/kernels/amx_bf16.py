"""bf16 linear on AMX tiles (the optional ``visualglm.kernels.native`` build): the weight re-laid once into
16 x 32 tiles that ``TDPBF16PS`` reads straight from memory, bf16 products summed in fp32 as ``F.linear``'s.

Each activation tile it loads feeds two output blocks. On one 16384x4096 weight (2-vCPU Xeon, Emerald
Rapids) it takes 4.15 / 4.25 / 6.46 ms at 1 / 8 / 64 rows, against 4.30 / 4.34 / 6.89 ms for oneDNN's
reordered weight (``PackedBF16Linear``) and 5.31 / 5.69 / 8.11 for ``F.linear``
(``benchmarks/quant_linear.py``). The re-laid weight replaces the plain one (no extra memory) and turns back
into it exactly for ``state_dict`` and ``dequantize``; a weight shared with another module (a tied output
layer) is left alone, as for ``PackedBF16Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visualglm.kernels import native
from visualglm.kernels.onednn_bf16 import PackedBF16Linear

TILE_OUTPUTS = 16  # outputs per tile
TILE_INPUTS = 32  # inputs per tile (16 pairs)


def amx_bf16_available() -> bool:
    """True when the optional kernels are built for this PyTorch and this CPU (AMX-BF16) runs them."""
    return native.load() is not None


def fits(linear: torch.nn.Linear) -> bool:
    """Shapes the kernel takes: outputs a multiple of 16, inputs of 32."""
    return linear.out_features % TILE_OUTPUTS == 0 and linear.in_features % TILE_INPUTS == 0


def pack_bf16_tiles(weight: torch.Tensor) -> torch.Tensor:
    """bf16 ``[N, K]`` -> ``[N/16, K/32, 16, 32]``: tile (b, c) row j holds inputs 32c + 2j and 32c + 2j + 1 of
    outputs 16b .. 16b + 15, side by side (``TDPBF16PS``'s B operand)."""
    n, k = weight.shape
    tiles = weight.reshape(n // TILE_OUTPUTS, TILE_OUTPUTS, k // TILE_INPUTS, 16, 2).permute(0, 2, 3, 1, 4)
    return tiles.reshape(n // TILE_OUTPUTS, k // TILE_INPUTS, 16, 32).contiguous()


def unpack_bf16_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_bf16_tiles``."""
    blocks, chunks = packed.shape[:2]
    weight = packed.view(blocks, chunks, 16, TILE_OUTPUTS, 2).permute(0, 3, 1, 2, 4)
    return weight.reshape(blocks * TILE_OUTPUTS, chunks * TILE_INPUTS)


class AmxBF16Linear(PackedBF16Linear):
    """A bf16 ``nn.Linear`` whose weight lives in AMX tile order (``packed``); bf16 CPU inputs run the AMX
    kernel, anything else ``F.linear`` on the weight turned back (see ``PackedBF16Linear``)."""

    @staticmethod
    def _pack(weight: torch.Tensor) -> torch.Tensor:
        return pack_bf16_tiles(weight)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return unpack_bf16_tiles(self.packed).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = native.load()
        if (kernel is None or x.dtype != torch.bfloat16 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad)):
            return F.linear(x, self.dequantize(), self.bias)
        out = kernel.bf16_linear(x.reshape(-1, self.in_features), self.packed)  # fp32 [rows, out]
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(torch.bfloat16).reshape(*x.shape[:-1], self.out_features)
