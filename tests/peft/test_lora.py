"""LoRA by composition: injection, layer_range as a list, QLoRA on quantized linears, merging, peft files."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import random_chatglm
from visualglm.checkpoint.load import apply_quantization
from visualglm.peft import (
    LoraConfig,
    LoRALinear,
    apply_adapter,
    count_parameters,
    dequantize_model,
    inject_lora,
    lora_modules,
    merge_lora,
    save_adapter,
)
from visualglm.peft.lora import frozen_forward

IDS = torch.tensor([[5, 6, 7, 8, 1001, 1004, 9, 10]])


def _randomize(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Give the (zero-initialised) B matrices values so that adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * std)


def test_fresh_adapter_changes_nothing_and_only_adapters_train() -> None:
    model = random_chatglm()
    before = model(IDS)
    names = inject_lora(model, LoraConfig.for_family("chatglm", rank=4))
    assert names == [f"transformer.layers.{i}.attention.{m}" for i in (0, 1) for m in ("query_key_value", "dense")]
    torch.testing.assert_close(model(IDS), before)
    trainable, total = count_parameters(model)
    assert trainable == sum(4 * (64 + out) for out in (192, 64)) * 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{part}.weight" for name in names for part in ("lora_A", "lora_B")}


def test_layer_range_is_a_list_of_indices_and_vision_is_excluded() -> None:
    from visualglm.checkpoint.load import build_model
    from visualglm.config import get_config

    model = build_model(get_config("visualglm-tiny"), device="cpu")
    model.config = get_config("visualglm-tiny")
    names = inject_lora(model, LoraConfig.for_family("visualglm", layer_range=[1]))
    assert names == ["transformer.layers.1.attention.query_key_value", "transformer.layers.1.attention.dense"]
    assert not any(n.startswith("image_encoder") for n in lora_modules(model))


def test_bad_options_fail_loudly() -> None:
    model = random_chatglm()
    for config, message in ((LoraConfig(target_modules=("nope",)), "no module matches"),
                            (LoraConfig(layer_range=[0, 7]), "no layer"), (LoraConfig(rank=0), "rank")):
        try:
            inject_lora(model, config)
        except ValueError as exc:
            assert message in str(exc)
        else:  # pragma: no cover
            raise AssertionError(f"{config} accepted")


def test_merge_gives_the_same_function_as_the_adapter() -> None:
    model = random_chatglm()
    inject_lora(model, LoraConfig(rank=4, alpha=8.0))
    _randomize(model)
    adapted = model(IDS)
    assert (adapted - random_chatglm()(IDS)).abs().max() > 1e-3
    assert merge_lora(model) == 4
    assert not lora_modules(model) and type(model.transformer.layers[0].attention.dense) is nn.Linear
    torch.testing.assert_close(model(IDS), adapted, atol=1e-4, rtol=1e-4)


def test_qlora_gradient_flows_through_the_int4_base_and_merges_against_its_dequantized_weights(monkeypatch) -> None:
    model = random_chatglm()
    apply_quantization(model, 4)
    inject_lora(model, LoraConfig(rank=4, alpha=8.0))
    _randomize(model)
    base = model.transformer.layers[0].attention.query_key_value.base_layer
    assert callable(getattr(base, "dequantize", None))
    # The custom backward (dequantize again) equals autograd through the dequantized weight.
    x = torch.randn(3, 64, requires_grad=True)
    frozen_forward(base, x).sum().backward()
    expected = torch.ones(3, base.out_features) @ base.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, expected, atol=1e-4, rtol=1e-4)

    # Only layer 1 has adapters: layer 0's input needs no gradient, layer 1's does, and no quantized layer
    # (adapted or not) may keep a float copy of its weight for the backward.
    model = random_chatglm()
    apply_quantization(model, 4)
    inject_lora(model, LoraConfig(rank=4, alpha=8.0, layer_range=[0]))
    _randomize(model)
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if hasattr(m, "qweight")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(IDS).float().logsumexp(-1).mean()
    assert not weight_shapes & set(saved)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model, dtype=torch.float32)
        dequantize_model(model, torch.float32)
        merged = model(IDS)
    assert not any(callable(getattr(m, "dequantize", None)) for m in model.modules())
    # The int4 kernel runs in bf16, the merged model in fp32: equal up to bf16 rounding.
    torch.testing.assert_close(merged, adapted, atol=0.05, rtol=0.05)


def test_adapter_files_round_trip(tmp_path) -> None:
    model = random_chatglm()
    inject_lora(model, LoraConfig(rank=4, alpha=8.0, layer_range=[1]))
    _randomize(model)
    expected = model(IDS)
    save_adapter(model, tmp_path, base_model="tiny")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.transformer.layers.1.attention.dense.lora_A.weight" in keys and len(keys) == 4
    fresh = apply_adapter(random_chatglm(), tmp_path)
    assert isinstance(fresh.transformer.layers[1].attention.dense, LoRALinear)
    torch.testing.assert_close(fresh(IDS), expected)


def test_the_peft_library_reads_our_adapters_and_we_read_its(tmp_path) -> None:
    import pytest

    peft = pytest.importorskip("peft")
    model = random_chatglm()
    inject_lora(model, LoraConfig(rank=4, alpha=8.0))
    _randomize(model)
    expected = model(IDS)
    save_adapter(model, tmp_path / "ours")
    base = random_chatglm()
    base.prepare_inputs_for_generation = lambda *args, **kwargs: {}  # PeftModelForCausalLM looks it up
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    torch.testing.assert_close(theirs.base_model.model(IDS), expected)

    # And the other way: an adapter made by peft (its own key names and suffix targets).
    base = random_chatglm()
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query_key_value"], init_lora_weights=False)
    peft_model = peft.get_peft_model(base, config)
    peft_expected = peft_model.base_model.model(IDS)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = apply_adapter(random_chatglm(), tmp_path / "peft")
    assert len(lora_modules(ours)) == 2
    torch.testing.assert_close(ours(IDS), peft_expected, atol=1e-5, rtol=1e-5)
