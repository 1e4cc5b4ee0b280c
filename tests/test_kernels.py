"""CPU kernel swaps: same results as the plain bf16 linear up to rounding, parameters shared."""

from __future__ import annotations

import torch
from torch import nn

from visualglm.kernels import cpu_bf16
from visualglm.kernels.cpu_bf16 import UpcastLinear, use_upcast_linears


def _pair() -> tuple[nn.Linear, UpcastLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96).to(torch.bfloat16)
    return linear, UpcastLinear(linear)


def test_many_rows_take_the_fp32_path_and_agree() -> None:
    linear, fast = _pair()
    x = torch.randn(2, cpu_bf16.MIN_ROWS, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = (x.float() @ linear.weight.float().t() + linear.bias.float())
        got = fast(x)
        plain = linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, cpu_bf16.MIN_ROWS, 96)
    # fp32 accumulation then one rounding: within one bf16 step of the exact result.
    assert ((got.float() - want).abs() <= want.abs() * 2**-7 + 1e-6).all()
    assert (got.float() - plain.float()).abs().max() < 0.05


def test_few_rows_and_training_keep_the_plain_kernel(monkeypatch) -> None:
    linear, fast = _pair()
    calls = []
    monkeypatch.setattr(cpu_bf16, "_fp32_copy", lambda w: calls.append(1) or w.float())
    with torch.inference_mode():
        assert torch.equal(fast(torch.ones(1, 3, 64, dtype=torch.bfloat16)),
                           linear(torch.ones(1, 3, 64, dtype=torch.bfloat16)))
    fast(torch.ones(1, 32, 64, dtype=torch.bfloat16))  # grad mode: the shared buffer would be unsafe
    assert calls == []


def test_swap_shares_parameters_and_keeps_ties() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight
    assert use_upcast_linears(model) == 1
    assert isinstance(model[1], UpcastLinear) and model[1].weight is model[0].weight
    assert use_upcast_linears(nn.Linear(4, 4)) == 0  # fp32 linears are left alone
