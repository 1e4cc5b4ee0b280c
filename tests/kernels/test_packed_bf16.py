"""PackedBF16Linear (oneDNN) and AmxBF16Linear (AMX tiles): the same products as a bf16 nn.Linear, the plain
weight back exactly, no silent moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visualglm.kernels import native
from visualglm.kernels.amx_bf16 import AmxBF16Linear
from visualglm.kernels.amx_tiles import pack_vnni_tiles, unpack_vnni_tiles
from visualglm.kernels.onednn_bf16 import PackedBF16Linear, onednn_bf16_available

KINDS = [
    pytest.param(PackedBF16Linear, marks=pytest.mark.skipif(not onednn_bf16_available(),
                                                            reason="no oneDNN bf16 linear in this build/CPU")),
    pytest.param(AmxBF16Linear, marks=pytest.mark.skipif(not native.available(),
                                                         reason="AMX kernels not built or no AMX-BF16 here")),
]


@pytest.fixture(params=KINDS)
def kind(request) -> type[PackedBF16Linear]:
    return request.param


def _pair(kind, bias: bool = True) -> tuple[nn.Linear, PackedBF16Linear]:
    torch.manual_seed(0)
    linear = nn.Linear(256, 320, bias=bias).to(torch.bfloat16)
    return linear, kind(linear)


def test_tile_layout_round_trips_and_puts_input_pairs_side_by_side() -> None:
    weight = torch.randn(48, 96).to(torch.bfloat16)
    tiles = pack_vnni_tiles(weight)
    assert tiles.shape == (3, 3, 16, 32)
    assert torch.equal(unpack_vnni_tiles(tiles), weight)
    # tile (1, 2), row 5: inputs 64 + 10 and 64 + 11 of outputs 16..31, one pair after another
    assert torch.equal(tiles[1, 2, 5].view(16, 2), weight[16:32, 74:76])


@pytest.mark.parametrize("shape", [(1, 256), (8, 256), (2, 3, 256), (1, 1, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_exact_product_to_bf16_rounding(kind, shape, bias) -> None:
    linear, packed = _pair(kind, bias)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = packed(x)
        plain = linear(x)
    exact = x.double() @ linear.weight.double().t() + (linear.bias.double() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 320)
    # fp32 accumulation then one rounding to bf16 (8 significant bits), as F.linear does.
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
    assert (got.float() - plain.float()).abs().max() <= plain.float().abs().max() * 2**-7


def test_state_dict_is_the_plain_weight_and_loads_back(kind) -> None:
    linear, packed = _pair(kind)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], linear.weight.detach())
    other = kind(nn.Linear(256, 320).to(torch.bfloat16))
    other.load_state_dict(state)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(other(x), packed(x))
    with pytest.raises(RuntimeError, match="size|expected"):
        other.load_state_dict({"weight": torch.zeros(3, 3, dtype=torch.bfloat16), "bias": state["bias"]})


def test_gradients_take_the_plain_linear_and_other_dtypes_fail_as_there(kind) -> None:
    linear, packed = _pair(kind)
    x = torch.randn(2, 256, dtype=torch.bfloat16, requires_grad=True)
    out = packed(x)
    out.float().sum().backward()
    want = linear(x.detach())
    assert out.dtype == torch.bfloat16 and x.grad is not None and torch.equal(out.detach(), want)
    assert torch.equal(x.grad, linear.weight.detach().sum(dim=0, keepdim=True).expand(2, 256))
    x32 = torch.randn(2, 256)
    with pytest.raises(RuntimeError) as plain:
        linear(x32)
    with pytest.raises(RuntimeError) as ours:
        packed(x32)
    assert str(ours.value) == str(plain.value)


def test_refuses_to_move_and_other_dtypes(kind) -> None:
    _, packed = _pair(kind)
    with pytest.raises(RuntimeError, match="cannot move"):
        packed.to("meta")
    with pytest.raises(ValueError, match="bf16"):
        kind(nn.Linear(4, 4))
