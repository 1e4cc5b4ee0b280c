"""Bit layouts of 4-bit weights, and the chunked round-to-nearest quantizers.

Three int4 layouts appear in this package:

- *tiled* (``pack_int4_tiled``): what ``torch._convert_weight_to_int4pack_for_cpu`` produces, so the CPU
  kernel reads our tensor directly. For each block of ``block_n`` output rows, bytes run over k, then over
  ``block_n / 2`` rows d; the low nibble holds row ``d``, the high nibble row ``d + block_n / 2``.
  ``block_n`` is the kernel's ``BLOCK_N``, which depends on the CPU: 64 where PyTorch dispatches to its
  AVX-512 kernels, 32 for AVX2. ``kernel_block_n`` finds it by packing a probe with PyTorch itself, so a
  layout we do not reproduce exactly is never handed to the kernel.
- *plain* (``pack_int4_plain``): ``[N, K/2]``, byte j of a row holds element 2j in the low nibble and 2j+1
  in the high nibble. Independent of the CPU: this is what quantized checkpoints store.
- *THUDM* (``unpack_thudm_int4``): ChatGLM-6B-int4's, signed values, element 2j in the HIGH nibble.
"""

from __future__ import annotations

import functools

import torch

# Rows quantized at a time: bounds the fp32 temporaries (rows x in_features x ~16 bytes) whatever the matrix
# size, so quantizing while loading never holds more than one weight and a slice of scratch. A multiple of
# every kernel block size, so tiled packing works chunk by chunk.
CHUNK_ROWS = 1024
INT4_BLOCK_SIZES = (32, 64)


def pack_int4_tiled(codes: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """int codes 0..15 ``[N, K]`` (N % block_n == 0, K even) -> uint8 ``[N, K/2]``, tiled layout."""
    n, k = codes.shape
    half = block_n // 2
    blocks = codes.to(torch.uint8).reshape(n // block_n, 2, half, k)
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # [B, half, K]
    return packed.transpose(1, 2).contiguous().reshape(n, k // 2)


def unpack_int4_tiled(packed: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """Inverse of ``pack_int4_tiled``: uint8 ``[N, K/2]`` -> uint8 codes ``[N, K]``."""
    n, half_k = packed.shape
    k = half_k * 2
    half = block_n // 2
    tiles = packed.reshape(n // block_n, k, half).transpose(1, 2)  # [B, half, K]
    return torch.stack([tiles & 15, tiles >> 4], dim=1).reshape(n, k)


def pack_int4_plain(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 ``[N, K]`` -> uint8 ``[N, K/2]``: element 2j low nibble, 2j+1 high nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4_plain(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_plain``: uint8 ``[N, K/2]`` -> uint8 codes ``[N, K]``."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def unpack_thudm_int4(packed: torch.Tensor) -> torch.Tensor:
    """THUDM int4 packing (int8 ``[out, in/2]``, element 2j in the high nibble, 2j+1 in the low, both signed
    4-bit two's complement) -> int8 values ``[out, in]`` in -8..7."""
    p = packed.view(torch.int8) if packed.dtype == torch.uint8 else packed.to(torch.int8)
    high = p >> 4  # arithmetic shift keeps the sign
    low = (p << 4) >> 4  # int8 shift left wraps, then sign-extends
    return torch.stack([high, low], dim=-1).reshape(p.shape[0], p.shape[1] * 2)


@functools.cache
def kernel_block_n() -> int | None:
    """The ``BLOCK_N`` of PyTorch's CPU int4 kernel on this machine, or None when there is no kernel or its
    layout is not one ``pack_int4_tiled`` reproduces (then the dequantize path is used)."""
    if not (hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")):
        return None
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        reference = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    except RuntimeError:
        return None
    for block_n in INT4_BLOCK_SIZES:
        if reference.shape == (128, 32) and torch.equal(pack_int4_tiled(probe, block_n), reference):
            return block_n
    return None


def quantize_int8_rows(weight: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``scale = max|W[row]| / 127``, ``q = round(W / scale)``.

    weight float ``[N, K]`` (any float dtype; computed in fp32) -> (int8 ``[N, K]``, fp32 scale ``[N]``).
    Rows are processed ``CHUNK_ROWS`` at a time; ``out`` may be a preallocated int8 ``[N, K]``.
    """
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device) if out is None else out
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, CHUNK_ROWS):
        w = weight[start:start + CHUNK_ROWS].float()
        s = w.abs().amax(dim=1) / 127.0
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + CHUNK_ROWS] = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:start + CHUNK_ROWS] = s
    return q, scale


def int4_group_codes(w: torch.Tensor, group_size: int, symmetric: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of fp32 rows ``[n, K]`` -> (uint8 codes 0..15 ``[n, K]``,
    scale ``[n, K/g]``, zero ``[n, K/g]``), with ``W ~ (q - 8) * scale + zero``.

    Symmetric: ``scale = max|w| / 7``, ``zero = 0``. Asymmetric: ``scale = (max - min) / 15``,
    ``zero = min + 8 * scale``. Scale and zero are rounded to bf16 first (the kernel's dtype), so the codes
    are chosen for the values the kernel will actually use.
    """
    n, k = w.shape
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
    return codes.clamp_(0, 15).reshape(n, k).to(torch.uint8), scale, zero
