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
from visualglm.kernels.amx_tiles import TILE_OUTPUTS, pack_vnni_tiles, tile_inputs, unpack_vnni_tiles
from visualglm.kernels.onednn_bf16 import PackedBF16Linear


def fits(linear: torch.nn.Linear) -> bool:
    """Shapes the kernel takes: outputs a multiple of 16, inputs of 32."""
    return (linear.out_features % TILE_OUTPUTS == 0
            and linear.in_features % tile_inputs(torch.bfloat16) == 0)


class AmxBF16Linear(PackedBF16Linear):
    """A bf16 ``nn.Linear`` whose weight lives in AMX tile order (``packed``); bf16 CPU inputs run the AMX
    kernel, anything else ``F.linear`` on the weight turned back (see ``PackedBF16Linear``)."""

    @staticmethod
    def _pack(weight: torch.Tensor) -> torch.Tensor:
        return pack_vnni_tiles(weight)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return unpack_vnni_tiles(self.packed).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = native.load()
        if (kernel is None or x.dtype != torch.bfloat16 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad)):
            return F.linear(x, self.dequantize(), self.bias)
        out = kernel.bf16_linear(x.reshape(-1, self.in_features), self.packed)  # fp32 [rows, out]
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(torch.bfloat16).reshape(*x.shape[:-1], self.out_features)
