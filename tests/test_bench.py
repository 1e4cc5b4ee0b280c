"""`visualglm bench` on a tiny random model: quantized random models and the figures it reports."""

from __future__ import annotations

import pytest
import torch

from visualglm.bench import random_model, run_bench
from visualglm.quant.linear import quantized_bits


@pytest.mark.parametrize("bits", [8, 4])
def test_random_quantized_model_is_built_quantized(bits: int) -> None:
    model = random_model("chatglm-tiny", torch.float32, quant=bits)
    quantized = [m for m in model.modules() if quantized_bits(m) == bits]  # any kernel form
    # Every transformer linear (4 per layer) is quantized; the output layer stays float (the plan skips it).
    assert len(quantized) == 4 * model.config.num_layers
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert all(not p.is_meta for p in [*model.parameters(), *model.buffers()])
    for module in quantized:  # filled from a random weight, not left as uninitialised memory
        weight = module.dequantize()
        assert torch.isfinite(weight).all() and weight.abs().max() > 0
        if module.bias is not None:
            assert not module.bias.any()


@pytest.mark.parametrize("config", ["chatglm-tiny", "visualglm-tiny", "glm-4v-tiny"])
def test_bench_reports_decode_figures(config: str) -> None:
    result = run_bench(None, config, "float32", batch=1, prompt_tokens=6, new_tokens=4, quant=4)
    assert result.new_tokens == 4
    assert result.decode_tokens_per_s > 0 and result.decode_limit_tokens_per_s > 0
    assert 0 < result.ratio_to_limit
    assert "int4" in result.model


def test_random_model_keeps_tied_embeddings() -> None:
    model = random_model("chatglm-tiny", torch.float32, quant=8)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_decode_bytes_leave_out_the_vision_tower() -> None:
    from visualglm.bench import bytes_per_decode_step

    model = random_model("visualglm-tiny", torch.float32)
    decoder_alone = random_model("chatglm-tiny", torch.float32)  # the same language-model config
    assert sum(p.numel() for p in model.image_encoder.parameters()) > 0
    assert bytes_per_decode_step(model, 8, 1) == bytes_per_decode_step(decoder_alone, 8, 1)
