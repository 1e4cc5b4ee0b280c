"""Weight-only INT8 / INT4 quantization of linear layers (model-agnostic)."""

from visualglm.quant.linear import Int4Linear, Int8Linear
from visualglm.quant.packing import (
    kernel_block_n,
    pack_int4_plain,
    pack_int4_tiled,
    unpack_int4_plain,
    unpack_int4_tiled,
    unpack_thudm_int4,
)
from visualglm.quant.swap import plan_quantization, quantize_model, swap_empty

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "kernel_block_n",
    "pack_int4_plain",
    "pack_int4_tiled",
    "plan_quantization",
    "quantize_model",
    "swap_empty",
    "unpack_int4_plain",
    "unpack_int4_tiled",
    "unpack_thudm_int4",
]
