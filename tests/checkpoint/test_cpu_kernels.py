"""Load-time CPU kernel choice: the rule per machine, and a transformed model that computes what the plain
one computes (to rounding), keeps its state_dict and leaves tied and fp32 weights alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import visualglm
from visualglm.checkpoint import cpu_kernels
from visualglm.checkpoint.cpu_kernels import KernelPlan, apply_cpu_kernels, plan_cpu_kernels
from visualglm.kernels import native
from visualglm.kernels.amx_bf16 import AmxBF16Linear
from visualglm.kernels.machine import CpuFacts
from visualglm.kernels.onednn_bf16 import PackedBF16Linear, onednn_bf16_available
from visualglm.quant.amx_int4 import AmxInt8Linear
from visualglm.quant.linear import Int8Linear
from visualglm.quant.onednn_int8 import OneDNNInt8Linear, onednn_int8_available

ZEN = CpuFacts(name="AMD EPYC", capability="AVX512", avx512_bf16=True, amx=False, vnni=True, onednn=True,
               threads=2)
XEON_AMX = dataclasses.replace(ZEN, name="Intel Xeon", amx=True)
AVX2 = dataclasses.replace(ZEN, capability="AVX2", avx512_bf16=False, vnni=False)


@pytest.fixture
def all_kernels_available(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_available", lambda: (True, True, True, True))
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)


def test_rule_per_machine(all_kernels_available, monkeypatch) -> None:
    # VNNI alone: oneDNN int8 is a ref path; grouped keys attend with the fused kernel where there is AVX-512 BF16;
    # the compiled strided-cache attention, where built, for heads with their own keys/values
    assert plan_cpu_kernels(ZEN) == KernelPlan("onednn", "plain", 3, "native", "plain", "sdpa")
    monkeypatch.setattr(cpu_kernels, "_available", lambda: (True, True, True, False))  # attention not built
    assert plan_cpu_kernels(ZEN) == KernelPlan("onednn", "plain", 3, "matmul", "plain", "sdpa")
    monkeypatch.setattr(cpu_kernels, "_available", lambda: (True, True, False, False))  # nor the AMX kernels
    assert plan_cpu_kernels(XEON_AMX) == KernelPlan("onednn", "onednn", 3, "sdpa", "plain", "sdpa")
    monkeypatch.setattr(cpu_kernels, "_available", lambda: (True, True, True, False))
    assert plan_cpu_kernels(XEON_AMX) == KernelPlan("amx", "amx", 3, "sdpa", "amx", "sdpa")
    # one activation plane is oneDNN's (the native kernel computes the exact planes only)
    assert plan_cpu_kernels(XEON_AMX, int8_activations=True) == KernelPlan("amx", "onednn", 1, "sdpa", "amx", "sdpa")
    monkeypatch.setattr(cpu_kernels, "_available", lambda: (True, True, True, True))
    assert plan_cpu_kernels(XEON_AMX) == KernelPlan("amx", "amx", 3, "native", "amx", "sdpa")
    monkeypatch.setattr(cpu_kernels, "cpu_lacks_bf16_matmul", lambda: True)
    assert plan_cpu_kernels(AVX2) == KernelPlan("upcast", "plain", 3, "native")
    assert plan_cpu_kernels(dataclasses.replace(AVX2, capability="DEFAULT")) == KernelPlan("upcast", "plain", 3)
    assert plan_cpu_kernels(XEON_AMX, mode="plain") == KernelPlan("plain", "plain", 3, "matmul")
    monkeypatch.setenv(cpu_kernels.ENV, "plain")
    assert plan_cpu_kernels(XEON_AMX) == KernelPlan("plain", "plain", 3, "matmul")
    monkeypatch.setenv(cpu_kernels.ENV, "fastest")
    with pytest.raises(ValueError, match="VISUALGLM_CPU_KERNELS='fastest'"):
        plan_cpu_kernels(XEON_AMX)


def _tiny(dtype: torch.dtype, quantize: int | None = None) -> nn.Module:
    from tests.conftest import random_chatglm

    model = random_chatglm().to(dtype)
    if quantize:
        model.config.extra = {}
        visualglm.checkpoint.load.apply_quantization(model, quantize)
    return model.eval()


def _logits(model: nn.Module, body: torch.Tensor) -> torch.Tensor:
    """Prompt logits of ``body`` + [gMASK] <sop> (a ChatGLM prompt)."""
    cfg = model.config
    ends = torch.tensor([[cfg.gmask_token_id, cfg.bos_token_id]]).expand(body.shape[0], 2)
    ids = torch.cat([body, ends], dim=1)
    positions, mask = model.prompt_inputs(ids)
    with torch.inference_mode():
        return model(ids, positions, mask).float()


@pytest.mark.parametrize("linear16, kind", [
    pytest.param("onednn", PackedBF16Linear,
                 marks=pytest.mark.skipif(not onednn_bf16_available(), reason="no oneDNN bf16 linear here")),
    pytest.param("amx", AmxBF16Linear,
                 marks=pytest.mark.skipif(not native.available(), reason="AMX kernels not built here")),
])
def test_bf16_model_swaps_untied_linears_and_computes_the_same(linear16, kind) -> None:
    model = _tiny(torch.bfloat16)
    ids = torch.randint(5, 100, (2, 7))
    before = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    counts = apply_cpu_kernels(model, plan=KernelPlan(linear16, "plain"))
    linears = [m for m in model.modules() if type(m) is kind]
    assert counts["bf16"] == len(linears) > 0
    assert type(model.lm_head) is nn.Linear  # tied to the embedding: left alone
    assert model.lm_head.weight is model.get_input_embeddings().weight
    after = _logits(model, ids)
    assert (after - before).abs().max() <= 0.02 * before.abs().max()
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_fp32_model_is_left_alone() -> None:
    model = _tiny(torch.float32)
    assert apply_cpu_kernels(model, plan=KernelPlan("onednn", "onednn")) == {"bf16": 0, "int8": 0, "int4": 0}
    assert all(type(m) is not PackedBF16Linear for m in model.modules())


def test_plain_plan_changes_nothing() -> None:
    model = _tiny(torch.bfloat16)
    assert apply_cpu_kernels(model, plan=KernelPlan("plain", "plain")) == {"bf16": 0, "int8": 0, "int4": 0}
    assert model.cpu_kernels == KernelPlan("plain", "plain")


@pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 linear here")
def test_int8_model_on_onednn_matches_the_weight_only_kernel() -> None:
    model = _tiny(torch.bfloat16, quantize=8)
    ids = torch.randint(5, 100, (1, 6))
    before = _logits(model, ids)
    counts = apply_cpu_kernels(model, plan=KernelPlan("plain", "onednn", 3))
    assert counts["int8"] == sum(isinstance(m, OneDNNInt8Linear) for m in model.modules()) > 0
    assert not any(type(m) is Int8Linear for m in model.modules())
    after = _logits(model, ids)
    assert (after - before).abs().max() <= 0.02 * before.abs().max()


@pytest.mark.skipif(not native.available(), reason="the AMX kernel is not built here (or the CPU lacks AMX)")
def test_int8_model_on_the_amx_kernel_matches_the_weight_only_kernel(tmp_path) -> None:
    model = _tiny(torch.bfloat16, quantize=8)
    ids = torch.randint(5, 100, (1, 6))
    before = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    counts = apply_cpu_kernels(model, plan=KernelPlan("plain", "amx", 3))
    assert counts["int8"] == sum(isinstance(m, AmxInt8Linear) for m in model.modules()) > 0
    assert not any(type(m) is Int8Linear for m in model.modules())
    after = _logits(model, ids)
    assert (after - before).abs().max() <= 0.02 * before.abs().max()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # the portable form


def test_int8_activations_need_onednn() -> None:
    model = _tiny(torch.bfloat16, quantize=8)
    with pytest.raises(ValueError, match="int8 activations"):
        apply_cpu_kernels(model, int8_activations=True, plan=KernelPlan("plain", "plain", 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_is_set_for_16_bit_models_only(dtype: torch.dtype) -> None:
    model = _tiny(dtype)
    ids = torch.randint(5, 100, (1, 9))
    cfg = model.config
    prompt = torch.cat([ids, torch.tensor([[cfg.gmask_token_id, cfg.bos_token_id]])], dim=1)

    def decode_logits() -> torch.Tensor:
        """Logits of three decode steps after the prompt (one query per head: the kernel in question)."""
        from visualglm.generation.engine import GenerationParams, generate_steps
        from visualglm.generation.sampling import SamplingParams

        params = GenerationParams(max_new_tokens=3, sampling=SamplingParams(do_sample=False))
        return torch.stack([step.logits.float() for step in generate_steps(model, prompt.tolist(), params=params)])

    before = decode_logits()
    apply_cpu_kernels(model, plan=KernelPlan("plain", "plain", 3, "sdpa"))
    kernels = {module.single_query for module in model.attention_modules()}
    assert kernels == ({"sdpa"} if dtype == torch.bfloat16 else {"matmul"})
    after = decode_logits()
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
    assert (after - before).abs().max() <= tolerance * before.abs().max()


def test_grouped_keys_get_the_grouped_kernel(glm4v_checkpoint) -> None:
    """A model whose heads share grouped keys/values (GLM-4V) takes ``grouped16``; ChatGLM's heads take
    ``attention16``; the answers stay the same up to bf16 noise."""
    glm4 = visualglm.load(str(glm4v_checkpoint), dtype=torch.bfloat16, progress=False)
    chatglm = _tiny(torch.bfloat16)
    assert all(module.kv_heads < module.heads for module in glm4.attention_modules())
    ids = torch.randint(5, 100, (1, 9)).tolist()

    def decode_logits(model: nn.Module, prompt: list[list[int]]) -> torch.Tensor:
        from visualglm.generation.engine import GenerationParams, generate_steps
        from visualglm.generation.sampling import SamplingParams

        params = GenerationParams(max_new_tokens=3, sampling=SamplingParams(do_sample=False), stop_ids=())
        return torch.stack([step.logits.float() for step in generate_steps(model, prompt, params=params)])

    apply_cpu_kernels(glm4, plan=KernelPlan("plain", "plain", 3, "matmul", "plain", "matmul"))
    assert {module.single_query for module in glm4.attention_modules()} == {"matmul"}
    before = decode_logits(glm4, ids)
    plan = KernelPlan("plain", "plain", 3, "matmul", "plain", "sdpa")
    apply_cpu_kernels(glm4, plan=plan)
    apply_cpu_kernels(chatglm, plan=plan)
    assert {module.single_query for module in glm4.attention_modules()} == {"sdpa"}
    assert {module.single_query for module in chatglm.attention_modules()} == {"matmul"}
    after = decode_logits(glm4, ids)
    assert (after - before).abs().max() <= 0.02 * before.abs().max()


@pytest.mark.parametrize(("dtype", "want"), [(torch.bfloat16, "native"), (torch.float16, "matmul"),
                                             (torch.float32, "matmul")])
def test_the_compiled_attention_goes_to_bf16_models_only(dtype: torch.dtype, want: str) -> None:
    from visualglm.kernels import strided_attention

    model = _tiny(dtype)
    apply_cpu_kernels(model, plan=KernelPlan("plain", "plain", 3, "native"))
    got = {module.single_query for module in model.attention_modules()}
    assert got == ({strided_attention.attend} if want == "native" else {want})
