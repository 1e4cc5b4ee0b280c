"""The weight layout the optional AMX kernels read (``visualglm.kernels.native``): tiles of 16 outputs whose
rows are 64 bytes, the B operand of AMX's dot-product instructions (VNNI order).

A tile row holds, for each of 16 outputs side by side, ``4 / itemsize`` consecutive inputs: 4 for int8 (and
uint8 codes; ``TDPBSSD``/``TDPBSUD``), 2 for bf16 (``TDPBF16PS``). A tile therefore covers 64 int8 or 32 bf16
inputs, and a weight ``[N, K]`` becomes ``[N/16, K/inputs, 16, 64 / itemsize]``.
"""

from __future__ import annotations

import torch

TILE_OUTPUTS = 16  # outputs per tile (and rows per tile)


def group_size(dtype: torch.dtype) -> int:
    """Consecutive inputs of one output in a tile row: 4 for 8-bit, 2 for 16-bit weights."""
    return 4 // torch.empty((), dtype=dtype).element_size()


def tile_inputs(dtype: torch.dtype) -> int:
    """Inputs one tile covers: 64 for 8-bit, 32 for 16-bit weights."""
    return TILE_OUTPUTS * group_size(dtype)


def pack_vnni_tiles(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[N/16, K/inputs, 16, 16 * group]``: row j of tile (b, c) holds inputs
    ``c * inputs + group * j ...`` (``group`` of them) of outputs ``16b .. 16b + 15``, side by side."""
    n, k = weight.shape
    group = group_size(weight.dtype)
    chunk = TILE_OUTPUTS * group
    tiles = weight.reshape(n // TILE_OUTPUTS, TILE_OUTPUTS, k // chunk, 16, group).permute(0, 2, 3, 1, 4)
    return tiles.reshape(n // TILE_OUTPUTS, k // chunk, 16, TILE_OUTPUTS * group).contiguous()


def unpack_vnni_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_vnni_tiles``."""
    blocks, chunks, _, width = packed.shape
    group = width // TILE_OUTPUTS
    weight = packed.view(blocks, chunks, 16, TILE_OUTPUTS, group).permute(0, 3, 1, 2, 4)
    return weight.reshape(blocks * TILE_OUTPUTS, chunks * TILE_OUTPUTS * group)
