import pytest
import torch
from torch import nn

from visualglm.checkpoint.load import build_model
from visualglm.checkpoint.tiny import init_random_weights
from visualglm.config import get_config
from visualglm.quant import Int4Linear, Int8Linear, quantize_model


class FakeLinear(nn.Module):
    """Duck-typed linear (like visualglm.kernels.cpu_bf16.UpcastLinear)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), FakeLinear(nn.Linear(128, 64)), nn.Embedding(10, 64),
                         nn.Sequential(nn.Linear(64, 32, bias=False)))


@pytest.mark.parametrize("bits,cls", [(8, Int8Linear), (4, Int4Linear)])
def test_quantize_sequential(bits, cls):
    m = small_model()
    assert quantize_model(m, bits, group_size=32, skip=["4.*"]) == 2
    assert isinstance(m[0], cls) and isinstance(m[2], cls)
    assert isinstance(m[3], nn.Embedding) and type(m[4][0]) is nn.Linear
    assert not any(p.requires_grad for n, p in m.named_parameters() if not n.startswith(("3.", "4.")))
    assert quantize_model(m, bits) == 1  # already-quantized modules are left alone
    m2 = small_model()
    assert quantize_model(m2, bits, skip=lambda name, mod: mod.in_features == 128) == 2


def test_bad_bits():
    with pytest.raises(ValueError):
        quantize_model(small_model(), 3)


def _tiny():
    model = build_model(get_config("chatglm-tiny"), device="cpu")
    init_random_weights(model)
    return model.eval()


# Bounds on the relative L2 error of the logits (measured: int8 1.1%, int4 19% on this seed). Per layer, int8
# rounding adds ~0.6% relative noise (max|w|/(127*sqrt(12)) for rows of 64 N(0,s) weights), bf16 activations
# in the kernel path ~0.4%; 8 quantized matmuls in 2 residual blocks accumulate to a few %. Int4 (g64, asym)
# adds ~9% per matmul, partly averaged out by the residual stream.
@pytest.mark.parametrize("bits,bound", [(8, 0.03), (4, 0.3)])
def test_quantize_chatglm_tiny(bits, bound):
    ref_model = _tiny()
    model = _tiny()
    ids = torch.tensor([[5, 17, 42, 99, 1001, 1004]])
    with torch.no_grad():
        ref = ref_model(ids).float()
    assert quantize_model(model, bits, skip=["lm_head"]) == 8  # 4 linears x 2 layers
    assert not isinstance(model.lm_head, (Int8Linear, Int4Linear))
    with torch.no_grad():
        out = model(ids).float()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < bound, err
    if bits == 8:
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
