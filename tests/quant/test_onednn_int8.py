"""OneDNNInt8Linear: Int8Linear's weights and results on oneDNN's int8 matmul.

Three activation planes reproduce the exact product of the activations with the int8 weight to fp32
rounding (more exact than the weight-only kernel, which rounds the activations to bf16); one plane is
dynamic activation quantization, bounded here by its own error formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visualglm.quant.linear import Int8Linear
from visualglm.quant.onednn_int8 import PLANE_STEP, OneDNNInt8Linear, onednn_int8_available, split_planes

pytestmark = pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 linear in this build/CPU")


def _int8(bias: bool = True, out: int = 192, inp: int = 256) -> Int8Linear:
    torch.manual_seed(0)
    return Int8Linear.from_linear(nn.Linear(inp, out, bias=bias))


def _exact(module: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ module.dequantize().double().t()
    return y + module.bias.double() if module.bias is not None else y


@pytest.mark.parametrize("planes", [1, 2, 3])
def test_split_planes_reconstructs_within_the_last_planes_step(planes) -> None:
    x = torch.randn(5, 300) * torch.logspace(-3, 2, 5)[:, None]
    x[2, 7] = 500.0  # an outlier feature
    x[4] = 0.0
    q, scales = split_planes(x, planes)
    assert q.dtype == torch.int8 and q.shape == (planes * 5, 300) and scales.shape == (planes, 5, 1)
    recon = sum(scales[p].double() * q[p * 5:(p + 1) * 5].double() for p in range(planes))
    amax = x.abs().amax(dim=-1, keepdim=True).double()
    # the last plane's rounding, plus fp32 rounding of x / scale (a few units in amax's last place)
    bound = amax / 127 / 2 / PLANE_STEP ** (planes - 1) + amax * 2**-22
    assert ((recon - x.double()).abs() <= bound * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(recon[4], torch.zeros(300, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 256), (8, 256), (2, 3, 256)])
def test_three_planes_equal_the_exact_product_to_fp32_rounding(shape) -> None:
    module = _int8()
    fast = OneDNNInt8Linear.from_int8(module, planes=3)
    x = torch.randn(*shape) * 4
    x[..., 11] = 80.0  # outlier features must not cost the small ones their precision
    with torch.inference_mode():
        got = fast(x)
        weight_only = module(x.to(torch.bfloat16)).double()
    exact = _exact(module, x)
    err = (got.double() - exact).abs().max()
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 192)
    assert err <= 1e-5 * exact.abs().max()
    assert err < (weight_only - exact).abs().max() / 10  # far closer than bf16 activations get


def test_one_plane_is_bounded_by_the_activation_rounding() -> None:
    module = _int8(bias=False)
    fast = OneDNNInt8Linear.from_int8(module, planes=1)
    x = torch.randn(4, 256)
    with torch.inference_mode():
        got = fast(x).double()
    exact = _exact(module, x)
    # |x - s q| <= s / 2 per element, s = max|x| / 127: the error is at most sum_k |W[n, k]| * s / 2.
    s = x.abs().amax(dim=-1, keepdim=True).double() / 127
    bound = s / 2 * module.dequantize().double().abs().sum(dim=1)[None, :]
    assert ((got - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert (got - exact).abs().max() > 0  # it is a different (approximate) product


def test_rows_do_not_depend_on_each_other() -> None:
    fast = OneDNNInt8Linear.from_int8(_int8(), planes=3)
    x = torch.randn(8, 256)
    x[3] *= 1000
    with torch.inference_mode():
        together = fast(x)
        alone = torch.cat([fast(x[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)


def test_bf16_inputs_give_bf16_outputs() -> None:
    module = _int8()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = OneDNNInt8Linear.from_int8(module)(x)
    exact = _exact(module, x.float())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()


def test_state_dict_is_int8linears_and_loads_back() -> None:
    module = _int8()
    fast = OneDNNInt8Linear.from_int8(module)
    state = fast.state_dict()
    assert set(state) == set(module.state_dict()) == {"weight", "scale", "bias"}
    for key, value in module.state_dict().items():
        assert torch.equal(state[key], value), key
    other = OneDNNInt8Linear.from_int8(_int8())
    other.load_state_dict(state)
    assert torch.equal(other.int8_weight(), module.weight)
    with pytest.raises(RuntimeError, match="expected int8"):
        other.load_state_dict({**state, "weight": state["weight"].float()})


def test_gradients_and_moves() -> None:
    module = _int8()
    fast = OneDNNInt8Linear.from_int8(module)
    x = torch.randn(2, 256, requires_grad=True)
    fast(x).sum().backward()
    assert torch.allclose(x.grad, module.dequantize().sum(dim=0), atol=1e-5)
    fast.half()  # dtype casts keep the fp32 scales
    assert fast.scale.dtype == torch.float32
    with pytest.raises(RuntimeError, match="cannot move"):
        fast.to("meta")
    with pytest.raises(ValueError, match="planes"):
        OneDNNInt8Linear.from_int8(module, planes=4)
