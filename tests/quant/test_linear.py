import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant import linear as qlinear
from visualglm.quant.linear import (
    Int4Linear,
    Int8Linear,
    pack_int4_plain,
    pack_int4_tiled,
    unpack_int4_plain,
    unpack_int4_tiled,
    unpack_thudm_int4,
)
from visualglm.quant.packing import kernel_block_n


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_linear(out_f=96, in_f=256, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


BACKENDS = ["kernel", "dequant"]


def test_int8_dequant_error_bound():
    lin = make_linear()
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 256)
    w = lin.weight.detach()
    assert torch.allclose(q.scale, w.abs().amax(1) / 127)
    err = (q.dequantize() - w).abs()
    assert (err <= q.scale[:, None] / 2 * (1 + 1e-5)).all()
    # the max element of each row is represented exactly (up to fp32 rounding)
    assert torch.allclose(q.dequantize().abs().amax(1), w.abs().amax(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_forward(backend, dtype, bias):
    lin = make_linear(bias=bias)
    q = Int8Linear.from_linear(lin)
    q.backend = backend
    x = torch.randn(2, 3, 256).to(dtype)  # 3-D input
    with torch.no_grad():
        y = q(x)
        ref_dq = F.linear(x.float(), q.dequantize(), None if not bias else lin.bias)
        ref = lin(x.float())
    assert y.dtype == dtype and y.shape == (2, 3, 96)
    # against the dequantized weight: only activation/accumulation rounding (bf16 ~ 2^-8 relative)
    tight = 1e-5 if (dtype == torch.float32 and backend == "dequant") else 1e-2
    assert rel(y, ref_dq) < tight
    # against the float weight: per-element error <= scale/2 ~ uniform, rms ~ max|w|/(127*sqrt(12)) ~ 0.9% of
    # the weight rms for N(0,1) rows of 256 (max ~ 3); with bf16 activations add ~0.5%
    assert rel(y, ref) < 0.02


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_dequant_error_bound(symmetric, group_size):
    lin = make_linear(out_f=80, bias=False)  # 80 rows: exercises padding to a multiple of 32
    q = Int4Linear.from_linear(lin, group_size=group_size, symmetric=symmetric)
    n_pad = -(-80 // q.block_n) * q.block_n
    assert q.qweight.shape == (n_pad, 128) and q.scales_and_zeros.shape == (256 // group_size, n_pad, 2)
    w = lin.weight.detach()
    codes = q.codes()
    assert codes.shape == (80, 256) and int(codes.max()) <= 15
    if symmetric:
        assert int(codes.min()) >= 1  # -7..7 around 8
    scale = q.scales_and_zeros[:, :80, 0].float().t().repeat_interleave(group_size, dim=1)
    err = (q.dequantize() - w).abs()
    # round to nearest: half a step, plus slack for the bf16-rounded scale/zero (2^-8 relative, <= 8 steps away)
    assert (err <= scale * (0.5 + 8 * 2**-8) + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_forward(backend, dtype, bias):
    lin = make_linear(out_f=80, bias=bias)
    q = Int4Linear.from_linear(lin, group_size=64)
    q.backend = backend
    x = torch.randn(2, 5, 256).to(dtype)
    with torch.no_grad():
        y = q(x)
        ref_dq = F.linear(x.float(), q.dequantize(), None if not bias else lin.bias)
        ref = lin(x.float())
    assert y.dtype == dtype and y.shape == (2, 5, 80)
    tight = 1e-5 if (dtype == torch.float32 and backend == "dequant") else 1e-2
    assert rel(y, ref_dq) < tight
    # asymmetric g64 on N(0,1): range ~ 4.7, step ~ 0.31, rms error ~ step/sqrt(12) ~ 0.09 -> ~9% relative
    assert rel(y, ref) < 0.15


@pytest.mark.parametrize("block_n", [32, 64])
def test_tiled_pack_roundtrips(block_n):
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (128, 96), dtype=torch.int32)
    packed = pack_int4_tiled(codes, block_n)
    assert packed.shape == (128, 48) and torch.equal(unpack_int4_tiled(packed, block_n).int(), codes)
    assert torch.equal(unpack_int4_plain(pack_int4_plain(codes)).int(), codes)
    # plain layout by hand: element 2j in the low nibble
    assert pack_int4_plain(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]


def test_kernel_layout_is_reproduced():
    """Where PyTorch has the CPU int4 kernel on this machine, our packer reproduces its layout exactly
    (block 64 under AVX-512 dispatch, 32 under AVX2), for full-size shapes too."""
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip("no CPU int4 kernel in this torch")
    block_n = kernel_block_n()
    capability = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX512": 64, "AVX2": 32}.get(capability)
    if expected is not None:
        assert block_n == expected, capability
    if block_n is None:
        pytest.skip(f"kernel layout on {capability} is not one we reproduce (dequantize path used)")
    codes = torch.randint(0, 16, (512, 4096), dtype=torch.int32)
    assert torch.equal(pack_int4_tiled(codes, block_n), torch._convert_weight_to_int4pack_for_cpu(codes, 1))


def test_thudm_int4_unpack_by_hand():
    # byte 0x7F -> high 7, low -1; 0x80 -> high -8, low 0; 0x1E -> 1, -2; 0xF9 -> -1, -7
    packed = torch.tensor([[0x7F, 0x80], [0x1E, 0xF9]], dtype=torch.uint8).view(torch.int8)
    expected = torch.tensor([[7, -1, -8, 0], [1, -2, -1, -7]], dtype=torch.int8)
    assert torch.equal(unpack_thudm_int4(packed), expected)


def _thudm_pack(values: torch.Tensor) -> torch.Tensor:
    """Reference packing (spec A8) for the tests: element 2j high nibble, 2j+1 low nibble."""
    v = values.to(torch.int16) & 15
    return ((v[:, 0::2] << 4) | v[:, 1::2]).to(torch.uint8).view(torch.int8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_from_thudm(backend):
    torch.manual_seed(2)
    values = torch.randint(-7, 8, (48, 128), dtype=torch.int8)
    scale = (torch.rand(48) * 0.1 + 0.01).half()
    bias = torch.randn(48)
    q = Int4Linear.from_thudm(_thudm_pack(values), scale, bias)
    q.backend = backend
    w = values.float() * scale.float()[:, None]
    # per-channel scale kept exactly up to bf16 rounding of the fp16 scale
    assert torch.allclose(q.dequantize(), w, rtol=2**-8, atol=0)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel(q(x), F.linear(x.float(), w, bias)) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_from_thudm(backend):
    torch.manual_seed(3)
    wq = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    scale = (torch.rand(32) * 0.01).half()
    q = Int8Linear.from_thudm(wq, scale)
    q.backend = backend
    w = wq.float() * scale.float()[:, None]
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert rel(q(x), x @ w.t()) < 1e-2


def test_input_grad_uses_dequant_path():
    q = Int8Linear.from_linear(make_linear(bias=True))
    x = torch.randn(2, 256, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters()) and not list(q.parameters())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_path_matches_dequantized_weight(bits, dtype, monkeypatch):
    """Many rows: dequantize into the scratch buffer + GEMM; same numbers as the dequantized weight up to
    activation rounding, and the buffer is reused across calls of different shapes."""
    monkeypatch.setitem(qlinear.PREFILL_MIN_ROWS, bits, 4)
    lin = make_linear(out_f=80, in_f=256, bias=True)
    q = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin, group_size=64)
    small = Int8Linear.from_linear(make_linear(8, 256, seed=3)) if bits == 8 else \
        Int4Linear.from_linear(make_linear(8, 256, seed=3), group_size=64)
    x = torch.randn(2, 3, 256).to(dtype)
    with torch.no_grad():
        ref = F.linear(x.float(), q.dequantize(), lin.bias)
        y = q(x)
        small(x)  # overwrites the shared scratch buffer
        y2 = q(x)
        few = q(x[:1, :1])  # 1 row: the weight-only kernel (or dequant) path
    assert y.dtype == dtype and y.shape == (2, 3, 80)
    assert torch.equal(y, y2)
    assert rel(y, ref) < 1e-2
    assert rel(few, ref[:1, :1]) < 1e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_quantization_equals_whole(bits, monkeypatch):
    """Quantizing a few rows at a time (as while loading) gives the same buffers as all rows at once."""
    lin = make_linear(out_f=200, in_f=128, bias=True)
    whole = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin, group_size=32)
    monkeypatch.setattr("visualglm.quant.packing.CHUNK_ROWS", 64)
    monkeypatch.setattr("visualglm.quant.linear.CHUNK_ROWS", 64)
    chunked = Int8Linear.from_linear(lin) if bits == 8 else Int4Linear.from_linear(lin, group_size=32)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, chunked.state_dict()[key]), key


def test_int4_state_dict_is_portable_across_layouts():
    """The state dict holds the plain layout; a module with another kernel block size (another CPU) loads
    it to the same weights."""
    lin = make_linear(out_f=100, in_f=128, bias=True)
    q = Int4Linear.from_linear(lin, group_size=32)
    state = q.state_dict()
    assert state["qweight"].shape == (100, 64) and state["qweight"].dtype == torch.uint8
    assert state["scales_and_zeros"].shape == (4, 100, 2)
    # plain layout: element 2j in the low nibble of byte j
    assert torch.equal(unpack_int4_plain(state["qweight"]), q.codes())
    other_block = 32 if q.block_n == 64 else 64
    other = Int4Linear.empty(100, 128, 32, torch.float32, device="cpu")
    other.block_n = other_block
    other.load_portable_(state["qweight"], state["scales_and_zeros"])
    other.bias = state["bias"].clone()
    assert other.qweight.shape[0] % other_block == 0
    assert torch.equal(other.dequantize(), q.dequantize())
    fresh = Int4Linear.empty(100, 128, 32, torch.float32, device="cpu")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize(), q.dequantize()) and torch.equal(fresh.bias, q.bias)
    with pytest.raises(RuntimeError, match="qweight"):
        fresh.load_state_dict({**state, "qweight": state["qweight"][:, :10]})
