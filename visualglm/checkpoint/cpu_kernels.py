"""Load-time choice of the CPU kernels a built model's linears run on (a transform: the model code never
knows), decided by rule from what this CPU offers (``visualglm.kernels.machine``).

What each precision gets (figures: ``benchmarks/quant_linear.py``, ``visualglm bench``, docs/benchmarks.md):

- bf16 ``nn.Linear``: ``AmxBF16Linear`` (``visualglm.kernels.amx_bf16``: the weight in AMX tile order, bf16
  products summed in fp32 as ``F.linear``'s) where the CPU has AMX and the optional kernel is built; else
  ``PackedBF16Linear`` (weight reordered once for oneDNN; same products as
  ``F.linear``, 7% faster on an AMX Xeon, 40% on a Zen 4 EPYC) where the CPU has AVX-512 BF16; on CPUs
  without native bf16 math ``UpcastLinear`` (fp32 GEMM for prefill) as before. Shared (tied) weights are
  left alone. fp32 and fp16 linears are not touched.
- ``Int8Linear``: ``AmxInt8Linear`` (``visualglm.quant.amx_int4``) where the CPU has AMX and the optional
  kernel is built: the activations split into three int8 planes (the same results to fp32 rounding), 32 GB/s
  of int8 weight at 1 row against oneDNN's 28 on a 2-vCPU Xeon. Else ``OneDNNInt8Linear`` (oneDNN's int8
  matmul on the same three planes; batch 8 costs about what batch 1 does) where the CPU has AMX; otherwise
  PyTorch's weight-only kernel as it is. On AVX-512 VNNI without AMX (AMD EPYC Zen 4/5) torch 2.13's oneDNN
  int8 linear runs a reference path (0.1 GB/s for a 16384x4096 weight against 24 GB/s for
  ``_weight_int8pack_mm``), so VNNI alone does not qualify.
- ``Int4Linear``: ``AmxInt4Linear`` (``visualglm.quant.amx_int4``) where the CPU has AMX and the optional
  kernel is built (``python -m visualglm.kernels.native build``): the same values, computed exactly (int8
  activation planes, int32 sums), one weight read per call for any number of rows; otherwise PyTorch's
  ``_weight_int4pack_mm_for_cpu`` as it is.
- decode-step attention (one query per head): PyTorch's fused ``scaled_dot_product_attention`` for 16-bit
  models on AMX CPUs (on a 2-vCPU Xeon it takes 0.5-1.9 ms per layer where two bf16 matmuls take 3.7-34 ms:
  8 rows of 540 cached tokens, 16 or 32 heads, because the matmul copies the strided cache rows first);
  elsewhere the two matmuls (on a Zen 4 EPYC the fused kernel was the slow one). Grouped keys (GLM-4V: the
  heads of a group folded into query rows of one key/value head) get the fused kernel where the CPU has
  AVX-512 BF16 too: on a Zen 4 EPYC a decode step of a 154M GLM-4 decoder (16 heads, 2 groups) took 22.5
  against 27.6 ms with 1 row of 16 tokens, 30.4 against 36.3 ms with 8 rows of 600
  (``python -m benchmarks.decode_attention``). fp32 models keep the matmuls everywhere (the same speed on
  the Xeon). Where the optional compiled attention is built (``python -m visualglm.kernels.native build``,
  AVX-512F or AVX2), 16-bit models whose heads have their own keys/values (ChatGLM-6B, VisualGLM-6B) get it
  (``visualglm.kernels.strided_attention``: it reads the strided cache in place, 2-3.6x the matmuls on
  copies per layer on a Zen 4 EPYC; measured there only, and chosen on AMX CPUs too).
- ``int8_activations=True`` (explicit opt-in): one int8 plane instead of three, i.e. dynamic per-row
  activation quantization. Faster at batch 8, less exact; measured by ``benchmarks/quant_accuracy.py``.

``VISUALGLM_CPU_KERNELS=plain`` in the environment turns every swap off (PyTorch's default kernels).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from visualglm.kernels import native, strided_attention
from visualglm.kernels.amx_bf16 import AmxBF16Linear
from visualglm.kernels.amx_bf16 import fits as amx_bf16_fits
from visualglm.kernels.cpu_bf16 import UpcastLinear, cpu_lacks_bf16_matmul
from visualglm.kernels.machine import CpuFacts, cpu_facts
from visualglm.kernels.onednn_bf16 import PackedBF16Linear, onednn_bf16_available
from visualglm.models.interface import Decoder
from visualglm.quant.amx_int4 import AmxInt4Linear, AmxInt8Linear
from visualglm.quant.amx_int4 import fits as amx_int4_fits
from visualglm.quant.amx_int4 import int8_fits as amx_int8_fits
from visualglm.quant.linear import Int4Linear, Int8Linear, quantized_bits
from visualglm.quant.onednn_int8 import OneDNNInt8Linear, onednn_int8_available
from visualglm.quant.output import TiedInt8Output

ENV = "VISUALGLM_CPU_KERNELS"


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel each kind of linear gets: ``linear16`` "amx" | "onednn" | "upcast" | "plain"; ``int8``
    "amx" | "onednn" | "plain"; ``planes`` 3 (exact) or 1 (dynamic int8 activations); ``attention16``: the decode-step
    attention of 16-bit models, "sdpa" | "matmul" (``visualglm.models.layers.SINGLE_QUERY_KERNELS``) | "native"
    (``visualglm.kernels.strided_attention``, the optional compiled kernel), and ``grouped16`` the same for
    models whose heads share grouped keys/values; ``int4`` "amx" | "plain"."""

    linear16: str
    int8: str
    planes: int = 3
    attention16: str = "matmul"
    int4: str = "plain"
    grouped16: str = "matmul"

    def describe(self) -> str:
        bf16 = {"amx": "AMX tiles", "onednn": "oneDNN reordered bf16",
                "upcast": "fp32 GEMM for prefill (no bf16 units)", "plain": "F.linear"}[self.linear16]
        int8 = {"amx": "AMX tiles, 3 exact activation planes",
                "onednn": "oneDNN int8 matmul, " + ("3 exact activation planes" if self.planes == 3
                                                    else "dynamic int8 activations"),
                "plain": "_weight_int8pack_mm"}[self.int8]
        kernels = {"sdpa": "fused SDPA", "matmul": "two matmuls", "native": "compiled, on the strided cache"}
        attention = kernels[self.attention16]
        if self.grouped16 != self.attention16:
            attention += f" ({kernels[self.grouped16]} for grouped keys)"
        int4 = "AMX tiles, exact activation planes" if self.int4 == "amx" else "_weight_int4pack_mm_for_cpu"
        return f"16-bit: {bf16}; INT8: {int8}; INT4: {int4}; 16-bit decode attention: {attention}"


@functools.cache
def _available() -> tuple[bool, bool, bool, bool]:
    """oneDNN's bf16 linear, oneDNN's int8 matmul, the optional AMX build (all its kernels), the optional
    strided-cache attention build."""
    return onednn_bf16_available(), onednn_int8_available(), native.available(), strided_attention.available()


def plan_cpu_kernels(facts: CpuFacts | None = None, int8_activations: bool = False,
                     mode: str | None = None) -> KernelPlan:
    """The rule. ``mode`` (default: ``$VISUALGLM_CPU_KERNELS`` or "auto"): "auto" or "plain"."""
    mode = mode or os.environ.get(ENV, "auto")
    if mode not in ("auto", "plain"):
        raise ValueError(f"{ENV}={mode!r}: expected 'auto' or 'plain'")
    planes = 1 if int8_activations else 3
    if mode == "plain":
        return KernelPlan("plain", "plain", planes)
    facts = facts or cpu_facts()
    bf16_ok, int8_ok, amx_built, attention_built = _available()
    if facts.amx and amx_built and facts.avx512_bf16 and facts.onednn and bf16_ok:  # (oneDNN: shapes it lacks)
        linear16 = "amx"
    elif facts.avx512_bf16 and facts.onednn and bf16_ok:
        linear16 = "onednn"
    elif cpu_lacks_bf16_matmul():
        linear16 = "upcast"
    else:
        linear16 = "plain"
    int8 = "onednn" if facts.amx and facts.onednn and int8_ok else "plain"
    if facts.amx and amx_built and planes == 3:  # the native kernel computes the exact planes only
        int8 = "amx"
    int4 = "amx" if facts.amx and amx_built else "plain"
    grouped = "sdpa" if facts.amx or facts.avx512_bf16 else "matmul"
    # The compiled kernel reads the strided cache in place: 2-3.6x the matmuls on copies for heads with their
    # own keys/values (2-vCPU Zen 4), slower than them for GLM-4V's 16 query rows per key/value head.
    vector_isa = facts.capability in ("AVX512", "AVX2")
    attention = "native" if attention_built and vector_isa else "sdpa" if facts.amx else "matmul"
    return KernelPlan(linear16, int8, planes, attention, int4, grouped)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of weights used by more than one module (a tied output layer and its embedding)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def apply_cpu_kernels(model: nn.Module, int8_activations: bool = False, plan: KernelPlan | None = None
                      ) -> dict[str, int]:
    """Swap ``model``'s CPU linears for the kernels ``plan`` (default: ``plan_cpu_kernels()``) chooses, in
    place, one layer at a time (the old weight is freed as its replacement is made: no second copy).
    Records the plan as ``model.cpu_kernels``; returns how many modules of each kind were swapped."""
    params = next(iter(model.parameters()), None)
    if params is None or params.device.type != "cpu":
        return {}
    plan = plan or plan_cpu_kernels(int8_activations=int8_activations)
    if int8_activations and plan.int8 != "onednn":  # (plan_cpu_kernels never picks "amx" for one plane)
        raise ValueError("int8 activations need oneDNN's int8 matmul, which this CPU or PyTorch build lacks")
    shared = _shared_weights(model)
    counts = {"bf16": 0, "int8": 0, "int4": 0}
    # Walk by name: a list of the modules themselves would keep every replaced layer (and its weight) alive
    # until the end, i.e. two copies of the model at the peak.
    for parent_name in [name for name, _ in model.named_modules()]:
        parent = model.get_submodule(parent_name)
        for name in [name for name, _ in parent.named_children()]:
            child = getattr(parent, name)
            new = _replacement(child, plan, shared)
            if new is not None:
                setattr(parent, name, new)
                counts[{8: "int8", 4: "int4"}.get(quantized_bits(new), "bf16")] += 1
            if isinstance(child, TiedInt8Output) and type(child.kernel) is Int8Linear:
                kernel = _int8_replacement(child.kernel, plan)
                if kernel is not None:
                    child.set_kernel(kernel)
                    counts["int8"] += 1
            child = new = None  # the replaced layer goes now, before the next one is built
    if isinstance(model, Decoder):
        # The dtype the decoder computes in is its input embedding's (quantized models keep it floating).
        dtype = model.get_input_embeddings().weight.dtype
        for module in model.attention_modules():
            kernel = plan.grouped16 if _grouped_keys(module) else plan.attention16
            if dtype not in (torch.bfloat16, torch.float16) or (kernel == "native" and dtype != torch.bfloat16):
                kernel = "matmul"  # (the compiled kernel reads bf16 only: it would decline every fp16 call)
            module.single_query = strided_attention.attend if kernel == "native" else kernel
    model.cpu_kernels = plan
    return counts


def _grouped_keys(attention: nn.Module) -> bool:
    """Whether ``attention``'s heads share grouped keys/values (GLM-4V: ``kv_heads`` < ``heads``)."""
    kv_heads = getattr(attention, "kv_heads", None)
    return kv_heads is not None and kv_heads < attention.heads


def _replacement(child: nn.Module, plan: KernelPlan, shared: set[int]) -> nn.Module | None:
    if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
        if plan.linear16 in ("amx", "onednn") and id(child.weight) not in shared:  # shared: would need a copy
            with torch.no_grad():
                if plan.linear16 == "amx" and amx_bf16_fits(child):
                    return AmxBF16Linear(child)
                return PackedBF16Linear(child)
        if plan.linear16 == "upcast":
            return UpcastLinear(child)
        return None
    if type(child) is Int8Linear:
        return _int8_replacement(child, plan)
    if type(child) is Int4Linear and plan.int4 == "amx" and amx_int4_fits(child):
        return AmxInt4Linear.from_int4(child)
    return None


def _int8_replacement(child: Int8Linear, plan: KernelPlan) -> nn.Module | None:
    if child.weight.device.type != "cpu" or plan.int8 == "plain":
        return None
    if plan.int8 == "amx" and amx_int8_fits(child):
        return AmxInt8Linear.from_int8(child)
    return OneDNNInt8Linear.from_int8(child, plan.planes)  # "onednn", or a shape the AMX kernel does not take
