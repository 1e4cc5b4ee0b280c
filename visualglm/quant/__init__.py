"""Weight-only INT8 / INT4 quantization of linear layers (model-agnostic)."""

from visualglm.quant.linear import Int4Linear, Int8Linear, pack_int4_tiled, unpack_int4_tiled, unpack_thudm_int4
from visualglm.quant.swap import quantize_model

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "pack_int4_tiled",
    "quantize_model",
    "unpack_int4_tiled",
    "unpack_thudm_int4",
]
