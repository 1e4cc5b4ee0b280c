"""Weight-only INT8 / INT4 linears on PyTorch's CUDA kernels (a transform of a built, quantized model).

``use_cuda_kernels(model)`` replaces every ``Int8Linear`` / ``Int4Linear`` whose weights are on a CUDA
device by a subclass that runs PyTorch's own CUDA kernel; the model code never knows. Both subclasses keep
the parent's ``state_dict`` (so a model loaded on a GPU saves the same portable checkpoint) and are still
instances of ``Int8Linear`` / ``Int4Linear`` for everything that checks (quantized saving, LoRA, summaries).

- ``CudaInt8Linear``: same buffers as ``Int8Linear`` (int8 ``[out, in]``, fp32 scale per row). In eager mode
  it calls ``torch._weight_int8pack_mm`` on CUDA. Under ``torch.compile`` it gives Inductor the plain
  expression ``F.linear(x, W.to(dtype)) * scale`` instead, which Inductor fuses into one generated kernel
  (the int8 weight read once, converted in registers), as gpt-fast does; the scale stays fp32 so that
  Inductor's weight-only pattern does not rewrite it back into the ATen kernel. ``VISUALGLM_CUDA_INT8`` =
  ``aten`` | ``fused`` forces one of the two everywhere (``auto``, the default, is the rule above).
- ``CudaInt4Linear``: the codes are kept in the layout of ``torch._weight_int4pack_mm`` (tinygemm, tensor
  cores, needs compute capability 8.0+ and bf16 activations), produced by
  ``torch._convert_weight_to_int4pack`` from our stored (CPU-independent) nibble order. The same
  ``W = (q - 8) * scale + zero`` per group as the CPU kernel, so ``scales_and_zeros`` ``[K/g, N, 2]`` bf16
  is shared as it is. The packed int32 tensor ``[N/8, K/(16 t), 32, t/2]`` (``t`` inner k-tiles) is held as
  its bytes, ``uint8 [N, K/2]``, so chunks of rows pack independently as in ``Int4Linear``.

Where no kernel applies (CPU tensors, GPUs before compute capability 8.0 for INT4, a gradient w.r.t. the
input) both fall back to dequantize + ``F.linear``, which is exact but reads the weight three times.
``tinygemm_words`` / ``tinygemm_unwords`` reproduce PyTorch's INT4 repacking in plain tensor code (any
device): the inverse is what saving and dequantizing use, and the forward is compared with PyTorch's own
kernel on a GPU (``tests/quant/test_cuda_kernels.py``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant.linear import CHUNK_ROWS, Int4Linear, Int8Linear

TILE_N = 8  # output rows per tinygemm n-tile: rows are padded to a multiple of this
INNER_K_TILES = (8, 4, 2)  # preferred first: 8 k-tiles of 16 = 16-byte loads
INT8_IMPLS = ("auto", "aten", "fused")
INT8_ENV = "VISUALGLM_CUDA_INT8"


def inner_k_tiles(in_features: int) -> int | None:
    """The largest tinygemm inner k-tile count whose 16-column tiles divide ``in_features``."""
    for tiles in INNER_K_TILES:
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def int4_kernel_available(device: torch.device | str) -> bool:
    """``torch._weight_int4pack_mm`` runs on ``device``: CUDA with compute capability 8.0 or later."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_weight_int4pack_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def int8_impl() -> str:
    """The INT8 path chosen by ``VISUALGLM_CUDA_INT8`` (see the module docstring)."""
    value = os.environ.get(INT8_ENV, "auto").strip().lower() or "auto"
    if value not in INT8_IMPLS:
        raise ValueError(f"{INT8_ENV}={value!r}: choose one of {', '.join(INT8_IMPLS)}")
    return value


# --- INT4 layouts ----------------------------------------------------------------------------------------

def tinygemm_bytes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 ``[N, K]`` -> the ``uint8 [N, K/2]`` that ``torch._convert_weight_to_int4pack``
    takes: element 2j in the HIGH nibble, 2j+1 in the low one (the reverse of our stored plain layout)."""
    c = codes.to(torch.uint8)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()


def _lane_view(data: torch.Tensor, tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[N, K/2]`` (bytes or codes pairs) -> ``[N/8, K/(16 t), 32, t/2, 4]``: n-tile, outer k-tile, warp lane,
    pair of inner k-tiles, and the 4 bytes one lane packs into one int32."""
    n, half_k = data.shape
    k_super = half_k * 2 // (16 * tiles)
    # byte column = outer * 8t + pair * 16 + tile * 8 + upper * 4 + lane % 4; row = n_tile * 8 + lane // 4
    x = data.reshape(n // TILE_N, TILE_N, k_super, tiles // 2, 2, 2, 4)
    x = x.permute(0, 2, 1, 6, 3, 4, 5)  # [n_tile, outer, lane // 4, lane % 4, pair, tile, upper]
    return x.reshape(n // TILE_N, k_super, 32, tiles // 2, 4), (n, half_k)


def tinygemm_words(data: torch.Tensor, tiles: int) -> torch.Tensor:
    """``tinygemm_bytes`` output ``uint8 [N, K/2]`` -> int32 ``[N/8, K/(16 t), 32, t/2]``, what
    ``torch._convert_weight_to_int4pack(data, t)`` returns (m16n8k16 tensor-core B layout): lane ``l`` of
    n-tile ``i`` reads row ``8 i + l // 4``, four bytes 4 apart; the int32 holds their high nibbles in its
    low 16 bits and their low nibbles in its high 16 bits. In tensor code, so it runs on any device."""
    if data.shape[0] % TILE_N or (data.shape[1] * 2) % (16 * tiles):
        raise ValueError(f"int4 weight {tuple(data.shape)} does not tile by {TILE_N} rows and {16 * tiles} columns")
    lanes, _ = _lane_view(data, tiles)
    v = lanes.to(torch.int64)
    high, low = v >> 4, v & 15
    word = (high[..., 0] | (high[..., 1] << 4) | (high[..., 2] << 8) | (high[..., 3] << 12)
            | (low[..., 0] << 16) | (low[..., 1] << 20) | (low[..., 2] << 24) | (low[..., 3] << 28))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def tinygemm_unwords(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tinygemm_words``: int32 ``[N/8, K/(16 t), 32, t/2]`` -> ``tinygemm_bytes`` layout."""
    n_tiles, k_super, _, half_tiles = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(((w >> (4 * i)) & 15) << 4) | ((w >> (16 + 4 * i)) & 15) for i in range(4)]
    lanes = torch.stack(parts, dim=-1).to(torch.uint8)  # [n_tile, outer, 32, t/2, 4]
    tiles = half_tiles * 2
    x = lanes.reshape(n_tiles, k_super, TILE_N, 4, tiles // 2, 2, 2)  # [.., lane // 4, lane % 4, pair, tile, upper]
    x = x.permute(0, 2, 1, 4, 5, 6, 3)  # [n_tile, lane // 4, outer, pair, tile, upper, lane % 4]
    return x.reshape(n_tiles * TILE_N, k_super * tiles * 8).contiguous()


def codes_from_tinygemm_bytes(data: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tinygemm_bytes``: ``uint8 [N, K/2]`` -> codes ``[N, K]``."""
    return torch.stack([data >> 4, data & 15], dim=-1).reshape(data.shape[0], data.shape[1] * 2)


def pack_tinygemm(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    """uint8 codes ``[n, K]`` (n a multiple of 8) -> the bytes ``uint8 [n, K/2]`` of tinygemm's int32 layout.
    On CUDA PyTorch's own conversion is used; elsewhere the tensor-code equivalent."""
    data = tinygemm_bytes(codes)
    if data.is_cuda and hasattr(torch, "_convert_weight_to_int4pack"):
        words = torch._convert_weight_to_int4pack(data, tiles)
    else:
        words = tinygemm_words(data, tiles)
    return words.contiguous().view(torch.uint8).reshape(codes.shape[0], codes.shape[1] // 2)


def unpack_tinygemm(packed: torch.Tensor, tiles: int) -> torch.Tensor:
    """Inverse of ``pack_tinygemm``: ``uint8 [n, K/2]`` -> uint8 codes ``[n, K]``."""
    n, half_k = packed.shape
    words = packed.contiguous().view(torch.int32).reshape(n // TILE_N, half_k * 2 // (16 * tiles), 32, tiles // 2)
    return codes_from_tinygemm_bytes(tinygemm_unwords(words))


class CudaInt4Linear(Int4Linear):
    """``Int4Linear`` with ``qweight`` in tinygemm's layout (``block_n`` 8), run by
    ``torch._weight_int4pack_mm`` on CUDA (compute capability 8.0+). Same ``state_dict`` as ``Int4Linear``."""

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int,
                 bias: torch.Tensor | None = None, block_n: int | None = None) -> None:
        if block_n not in (None, TILE_N):
            raise ValueError(f"CudaInt4Linear packs rows {TILE_N} at a time, got block_n={block_n}")
        super().__init__(qweight, scales_and_zeros, group_size, out_features, bias, block_n=TILE_N)
        tiles = inner_k_tiles(self.in_features)
        if tiles is None:
            raise ValueError(f"in_features {self.in_features} is not a multiple of 32 (tinygemm k-tiles)")
        self.inner_k_tiles = tiles
        self.use_kernel: bool | None = None  # decided from the device on first use (or by use_cuda_kernels)

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, bias_dtype: torch.dtype | None = None,
              device: torch.device | str = "meta") -> CudaInt4Linear:
        n_pad = -(-out_features // TILE_N) * TILE_N
        qweight = torch.empty(n_pad, in_features // 2, dtype=torch.uint8, device=device)
        sz = torch.empty(in_features // group_size, n_pad, 2, dtype=torch.bfloat16, device=device)
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(qweight, sz, group_size, out_features, bias)

    @classmethod
    def from_int4(cls, module: Int4Linear) -> CudaInt4Linear:
        """The same weights repacked for tinygemm, ``CHUNK_ROWS`` rows at a time on ``module``'s device (only
        one chunk of codes exists besides the two packed weights)."""
        device = module.qweight.device
        bias = module.bias
        new = cls.empty(module.out_features, module.in_features, module.group_size,
                        None if bias is None else bias.dtype, device=device)
        if bias is not None:
            new.bias = bias
        sz, block = module.scales_and_zeros, module.block_n

        def rows(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            end = -(-b // block) * block  # CHUNK_ROWS is a multiple of every block size: a is aligned
            codes = module._unpack_codes(module.qweight[a:end])[: b - a]
            return codes, sz[:, a:b, 0].t(), sz[:, a:b, 1].t()

        new._fill(module.out_features, rows, device)
        new.use_kernel = int4_kernel_available(device)
        return new

    def _pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_tinygemm(codes, self.inner_k_tiles)

    def _unpack_codes(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_tinygemm(packed, self.inner_k_tiles)

    def _dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        k, g = self.in_features, self.group_size
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [N_pad, K/g, 2]
        for start in range(0, self.padded_rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, self.padded_rows)
            q = self._unpack_codes(self.qweight[start:stop]).float().view(stop - start, k // g, g)
            part = sz[start:stop]
            out[start:stop].copy_(q.sub_(8).mul_(part[..., :1]).add_(part[..., 1:]).view(stop - start, k))
        return out

    def words(self) -> torch.Tensor:
        """``qweight`` as the int32 ``[N/8, K/(16 t), 32, t/2]`` tensor the kernel reads (a view)."""
        n, half_k = self.qweight.shape
        return self.qweight.view(torch.int32).view(n // TILE_N, half_k * 2 // (16 * self.inner_k_tiles), 32,
                                                   self.inner_k_tiles // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad
        if self.use_kernel is None and not torch.compiler.is_compiling():
            self.use_kernel = int4_kernel_available(self.qweight.device)
        if self.backend != "dequant" and x.is_cuda and self.use_kernel and not grad:
            x2d = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # tinygemm takes bf16 only
            out = torch._weight_int4pack_mm(x2d, self.words(), self.group_size, self.scales_and_zeros)
            out = out[:, : self.out_features]
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.backend == "kernel":
            raise RuntimeError("the int4 CUDA kernel is unavailable for this call (needs a CUDA tensor on compute "
                               "capability 8.0+, no input grad)")
        w = self.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class CudaInt8Linear(Int8Linear):
    """``Int8Linear`` (same buffers and state_dict) that runs PyTorch's CUDA path for INT8 weights: the ATen
    kernel in eager mode, the fusable expression under ``torch.compile`` (see the module docstring)."""

    @classmethod
    def from_int8(cls, module: Int8Linear) -> CudaInt8Linear:
        new = cls(module.weight, module.scale, None)
        new.bias = module.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad
        if self.backend == "dequant" or not x.is_cuda or grad:
            if self.backend == "kernel":
                raise RuntimeError("the int8 CUDA path needs a CUDA tensor and no input grad")
            return super().forward(x)
        impl = int8_impl()
        if impl == "auto":
            impl = "fused" if torch.compiler.is_compiling() else "aten"
        x2d = x.reshape(-1, self.in_features)
        if impl == "aten" and hasattr(torch, "_weight_int8pack_mm"):
            out = torch._weight_int8pack_mm(x2d.contiguous(), self.weight, self.scale.to(x.dtype))
        else:
            out = (F.linear(x2d, self.weight.to(x.dtype)) * self.scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def use_cuda_kernels(model: nn.Module, *, any_device: bool = False) -> dict[str, int]:
    """Swap the quantized linears whose weights are on CUDA (every one with ``any_device``, for tests) for
    ``CudaInt8Linear`` / ``CudaInt4Linear``, one at a time. Returns how many of each were swapped."""
    counts = {"int8": 0, "int4": 0}
    for name, module in list(model.named_modules()):
        if type(module) is Int8Linear and (any_device or module.weight.is_cuda):
            _set_submodule(model, name, CudaInt8Linear.from_int8(module))
            counts["int8"] += 1
        elif type(module) is Int4Linear and (any_device or module.qweight.is_cuda):
            _set_submodule(model, name, CudaInt4Linear.from_int4(module))
            counts["int4"] += 1
    return counts


__all__ = ["CudaInt4Linear", "CudaInt8Linear", "inner_k_tiles", "int4_kernel_available", "pack_tinygemm",
           "tinygemm_bytes", "tinygemm_unwords", "tinygemm_words", "unpack_tinygemm", "use_cuda_kernels"]
