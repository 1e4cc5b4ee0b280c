"""CUDA weight-only kernels: the tinygemm repacking, the module swap and the fallbacks (CPU); the kernels
themselves against the dequantized reference (only where a CUDA device is present)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visualglm.checkpoint.load import default_dtype
from visualglm.config import get_config
from visualglm.quant import cuda_kernels as ck
from visualglm.quant.linear import Int4Linear, Int8Linear

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _codes(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _linear(out_f: int = 100, in_f: int = 256, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias)


def test_tinygemm_bytes_put_even_elements_in_the_high_nibble() -> None:
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert ck.tinygemm_bytes(codes).tolist() == [[0x12, 0x34]]  # gpt-fast: w[:, ::2] << 4 | w[:, 1::2]
    assert torch.equal(ck.codes_from_tinygemm_bytes(ck.tinygemm_bytes(codes)), codes)


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_tinygemm_words_follow_the_kernel_lane_layout(tiles: int) -> None:
    # Spelled out from PyTorch's matrix_to_m16n8k16_Bint4_layout: lane t of n-tile i, outer k-tile o and
    # inner pair j reads row 8i + t//4, bytes b = 8*tiles*o + 16j + t%4 (+4, +8, +12); the int32 holds the
    # four high nibbles (even elements) in bits 0-15 and the four low nibbles (odd elements) in bits 16-31.
    codes = _codes(16, 16 * tiles * 2)
    words = ck.tinygemm_words(ck.tinygemm_bytes(codes), tiles)
    assert words.shape == (2, 2, 32, tiles // 2) and words.dtype == torch.int32
    w = words.to(torch.int64) & 0xFFFFFFFF
    for i, o, t, j in [(0, 0, 0, 0), (1, 1, 31, tiles // 2 - 1), (0, 1, 13, 0), (1, 0, 6, tiles // 2 - 1)]:
        row = 8 * i + t // 4
        for slot, extra in enumerate((0, 4, 8, 12)):
            byte = 8 * tiles * o + 16 * j + t % 4 + extra
            word = int(w[i, o, t, j])
            assert (word >> (4 * slot)) & 15 == codes[row, 2 * byte]
            assert (word >> (16 + 4 * slot)) & 15 == codes[row, 2 * byte + 1]


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_tinygemm_pack_round_trip(tiles: int) -> None:
    codes = _codes(24, 512)
    packed = ck.pack_tinygemm(codes, tiles)
    assert packed.shape == (24, 256) and packed.dtype == torch.uint8
    assert torch.equal(ck.unpack_tinygemm(packed, tiles), codes)


def test_tinygemm_shapes_that_do_not_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="does not tile"):
        ck.tinygemm_words(torch.zeros(12, 64, dtype=torch.uint8), 2)


def test_inner_k_tiles_pick_the_widest_that_divides() -> None:
    assert ck.inner_k_tiles(4096) == 8 and ck.inner_k_tiles(13696) == 8  # GLM-4's MLP width
    assert ck.inner_k_tiles(64 * 3) == 4 and ck.inner_k_tiles(96) == 2 and ck.inner_k_tiles(40) is None


@pytest.mark.parametrize(("out_f", "group"), [(100, 64), (96, 32), (8, 256)])
def test_cuda_int4_repack_keeps_the_weights(out_f: int, group: int) -> None:
    q = Int4Linear.from_linear(_linear(out_f, 256), group)
    cuda = ck.CudaInt4Linear.from_int4(q)
    assert isinstance(cuda, Int4Linear) and cuda.padded_rows % 8 == 0
    assert torch.equal(cuda.codes(), q.codes())
    assert torch.equal(cuda.dequantize(), q.dequantize())
    sd, ref = cuda.state_dict(), q.state_dict()  # the portable checkpoint layout, unchanged
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_cuda_int4_loads_a_portable_state_dict() -> None:
    q = Int4Linear.from_linear(_linear(), 128)
    fresh = ck.CudaInt4Linear.empty(100, 256, 128, torch.float32, device="cpu")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.dequantize(), q.dequantize())


def test_cuda_int4_falls_back_to_the_dequantized_weight_off_gpu() -> None:
    lin = _linear()
    q = Int4Linear.from_linear(lin, 64)
    cuda = ck.CudaInt4Linear.from_int4(q)
    assert cuda.use_kernel is False  # a CPU tensor: no tinygemm
    x = torch.randn(3, 5, 256)
    want = F.linear(x, q.dequantize(), q.bias)
    assert torch.allclose(cuda(x), want, atol=1e-5, rtol=1e-5)
    cuda.backend = "kernel"
    with pytest.raises(RuntimeError, match="int4 CUDA kernel is unavailable"):
        cuda(x)


def test_cuda_int8_falls_back_off_gpu() -> None:
    q = Int8Linear.from_linear(_linear())
    cuda = ck.CudaInt8Linear.from_int8(q)
    assert isinstance(cuda, Int8Linear) and cuda.weight is q.weight
    x = torch.randn(2, 256)
    assert torch.equal(cuda(x), q(x))  # off the GPU: exactly Int8Linear's own CPU path
    cuda.backend = "kernel"
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        cuda(x)


def test_int8_impl_setting(monkeypatch) -> None:
    monkeypatch.setenv(ck.INT8_ENV, "fused")
    assert ck.int8_impl() == "fused"
    monkeypatch.setenv(ck.INT8_ENV, "fast")
    with pytest.raises(ValueError, match="choose one of auto, aten, fused"):
        ck.int8_impl()


def test_use_cuda_kernels_swaps_only_cuda_modules_unless_told() -> None:
    model = nn.Sequential(Int8Linear.from_linear(_linear()), Int4Linear.from_linear(_linear(256, 256), 64))
    assert ck.use_cuda_kernels(model) == {"int8": 0, "int4": 0}  # CPU weights stay as they are
    assert type(model[0]) is Int8Linear
    assert ck.use_cuda_kernels(model, any_device=True) == {"int8": 1, "int4": 1}
    assert type(model[0]) is ck.CudaInt8Linear and type(model[1]) is ck.CudaInt4Linear
    assert ck.use_cuda_kernels(model, any_device=True) == {"int8": 0, "int4": 0}  # already swapped


def test_int4_kernel_needs_a_cuda_device() -> None:
    assert not ck.int4_kernel_available("cpu")


def test_default_dtype_is_bf16_on_cuda_and_stays_as_before_on_cpu() -> None:
    config = get_config("chatglm-tiny")
    for stored in ("float16", "float32", "bfloat16"):
        config.torch_dtype = stored
        assert default_dtype(config, torch.device("cuda")) == torch.bfloat16
    config.torch_dtype = "float16"
    assert default_dtype(config, torch.device("cpu")) == torch.bfloat16
    config.torch_dtype = "float32"
    assert default_dtype(config, torch.device("cpu")) == torch.float32


# --- on a GPU only (benchmarks/gpu_check.sh runs these) --------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_our_tinygemm_layout_equals_pytorchs(tiles: int) -> None:
    data = ck.tinygemm_bytes(_codes(64, 512))
    theirs = torch._convert_weight_to_int4pack(data.cuda(), tiles).cpu()
    assert torch.equal(ck.tinygemm_words(data, tiles), theirs)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 33])
def test_cuda_int4_kernel_matches_the_dequantized_weight(rows: int) -> None:
    q = Int4Linear.from_linear(_linear(200, 512), 128).cuda()
    cuda = ck.CudaInt4Linear.from_int4(q)
    if not cuda.use_kernel:
        pytest.skip("compute capability below 8.0: no tinygemm")
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), q.dequantize().float(), q.bias.float())
    got = cuda(x).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@needs_cuda
@pytest.mark.parametrize("impl", ["aten", "fused"])
def test_cuda_int8_paths_match_the_dequantized_weight(impl: str, monkeypatch) -> None:
    monkeypatch.setenv(ck.INT8_ENV, impl)
    q = ck.CudaInt8Linear.from_int8(Int8Linear.from_linear(_linear(200, 512)).cuda())
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), q.dequantize().float(), q.bias.float())
    assert ((q(x).float() - want).norm() / want.norm()).item() < 1e-2
