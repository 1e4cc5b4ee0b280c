import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant.linear import (
    Int4Linear,
    Int8Linear,
    pack_int4_tiled,
    unpack_int4_tiled,
    unpack_thudm_int4,
)


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
    assert q.qweight.shape == (96, 128) and q.scales_and_zeros.shape == (256 // group_size, 96, 2)
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


def test_tiled_pack_matches_aten_and_roundtrips():
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (64, 128), dtype=torch.int32)
    packed = pack_int4_tiled(codes)
    assert torch.equal(unpack_int4_tiled(packed).int(), codes)
    if hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(codes, 1))


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
