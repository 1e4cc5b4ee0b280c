"""TiedInt8Output: logits from an INT8 copy of a tied output layer; the embedding stays float and shared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import random_chatglm
from visualglm.quant.output import TiedInt8Output, output_is_tied, quantize_tied_output


def test_tied_model_gets_a_private_int8_copy() -> None:
    model = random_chatglm().to(torch.bfloat16).eval()
    embedding = model.get_input_embeddings().weight
    keys = set(model.state_dict())
    assert output_is_tied(model) and quantize_tied_output(model)
    assert not quantize_tied_output(model)  # once only
    head = model.lm_head
    assert isinstance(head, TiedInt8Output) and head.weight is embedding
    assert set(model.state_dict()) == keys  # the copy is not saved
    assert head.extra_nbytes() == embedding.numel() + embedding.shape[0] * 4
    x = torch.randn(3, embedding.shape[1], dtype=torch.bfloat16)
    with torch.inference_mode():
        got = head(x).double()
    exact = x.double() @ embedding.double().t()
    # int8 rows (error <= scale / 2 per weight) plus bf16 rounding of activations and output
    row_scale = embedding.double().abs().amax(dim=1) / 127
    bound = (x.double().abs().sum(dim=1, keepdim=True) * row_scale[None] / 2) * 1.01 + exact.abs() * 2**-7
    assert ((got - exact).abs() <= bound).all()
    assert (got - exact).abs().max() > 0


def test_gradients_use_the_float_weight_and_moves_are_refused() -> None:
    linear = nn.Linear(32, 50, bias=False)
    head = TiedInt8Output(linear)
    x = torch.randn(2, 32, requires_grad=True)
    out = head(x)
    out.sum().backward()
    assert torch.allclose(out, x @ linear.weight.t())
    with pytest.raises(RuntimeError, match="cannot move"):
        head.to("meta")
    with pytest.raises(ValueError, match="bias-free"):
        TiedInt8Output(nn.Linear(4, 4))


def test_untied_output_is_not_copied() -> None:
    model = random_chatglm().eval()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert not output_is_tied(model) and not quantize_tied_output(model)


def test_load_with_quantize_also_output_copies_a_tied_head(tiny_checkpoint) -> None:
    import visualglm

    plain = visualglm.load(tiny_checkpoint, dtype="float32", quantize=8, progress=False)
    copied = visualglm.load(tiny_checkpoint, dtype="float32", quantize=8, quantize_also=("output",),
                            progress=False)
    assert type(plain.lm_head) is nn.Linear and isinstance(copied.lm_head, TiedInt8Output)
    assert copied.lm_head.weight is copied.get_input_embeddings().weight
    assert set(copied.state_dict()) == set(plain.state_dict())
