"""Peak memory (RSS) of one QLoRA training step of full-size VisualGLM-6B, with random weights, on CPU.

The model is built on the meta device; every language-model linear is quantized to INT4 as soon as its
(random) weight exists, one at a time, so the bf16 model is never in memory at once (the reference's QLoRA
claim: 9.8 GB). Embeddings, LayerNorms and the vision tower are bf16, as they stay in floating point in the
reference. LoRA follows the reference QLoRA script (rank 10, layers 0 and 14, attention qkv and dense);
then one forward + backward + AdamW step on an image and a short answer.

    .venv/bin/python benchmarks/qlora_memory.py [--config visualglm-6b] [--answer-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch import nn

from visualglm.checkpoint.load import build_model
from visualglm.config import get_config
from visualglm.families import family_spec
from visualglm.finetune.data import Batch
from visualglm.finetune.train import LossModule, enable_activation_checkpointing
from visualglm.peft import LoraConfig, count_parameters, inject_lora
from visualglm.quant.swap import plan_quantization, swap_empty


def rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


_TILE = 1 << 20


def random_bf16(shape: torch.Size, std: float = 0.02) -> torch.Tensor:
    """A bf16 tensor of ``shape`` filled (every page written, so it counts in RSS) by repeating one random
    tile: random enough for a memory measurement, and far cheaper than drawing billions of normals."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    tile = (torch.randn(min(_TILE, flat.numel())) * std).to(torch.bfloat16)
    for start in range(0, flat.numel(), tile.numel()):
        stop = min(start + tile.numel(), flat.numel())
        flat[start:stop] = tile[: stop - start]
    return out


def build_int4_random(config_name: str, seed: int = 0) -> nn.Module:
    """The model with INT4 language-model linears and bf16 everything else, random weights.

    Each distinct linear shape is quantized once from random weights; every module then gets its own copy of
    those buffers (the memory of a real INT4 model, without quantizing 6 billion random numbers)."""
    torch.manual_seed(seed)
    config = get_config(config_name)
    model = build_model(config)  # meta: no memory
    model.config = config
    plan = plan_quantization(model, 4, skip=family_spec(config).quant_skip)
    quantized: dict[tuple[int, int], nn.Module] = {}
    for module in swap_empty(model, plan, 4, bias_dtype=torch.bfloat16).values():
        key = (module.out_features, module.in_features)
        if key not in quantized:
            quantized[key] = module.quantize_(random_bf16(torch.Size(key)))  # the float weight is dropped
        else:
            source = quantized[key]
            module.qweight, module.scales_and_zeros = source.qweight.clone(), source.scales_and_zeros.clone()
        if module.bias is not None:
            module.bias = torch.zeros(module.out_features, dtype=torch.bfloat16)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if isinstance(module, nn.LayerNorm) and name == "weight":
                value = torch.ones(param.shape, dtype=torch.bfloat16)
            else:
                value = random_bf16(param.shape)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"still on meta: {leftover[:5]}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="visualglm-6b")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="text tokens around the 32 image tokens")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--layer-range", type=int, nargs="+", default=[0, 14])
    parser.add_argument("--lora-rank", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    start = time.time()
    model = build_int4_random(args.config)
    built_s, built_rss = time.time() - start, rss_gb()
    inject_lora(model, LoraConfig.for_family(model.config.family, rank=args.lora_rank, layer_range=args.layer_range))
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    config = model.config
    # [gMASK] <sop> end the prompt; the image occupies 32 slots after 2 text tokens.
    prompt = [5] * 2 + [0] * config.image_length + [5] * args.prompt_tokens + [config.gmask_token_id,
                                                                               config.bos_token_id]
    answer = [6] * args.answer_tokens + [config.eos_token_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    size = config.eva_config.image_size
    batch = Batch(ids, labels, torch.randn(1, 3, size[0], size[1]), [0], [2], [None])
    loss_module = LossModule(model, cache_images=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    step_start = time.time()
    loss, tokens = loss_module(batch)
    (loss / tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result = {"config": args.config, "sequence_tokens": ids.shape[1], "trainable_parameters": trainable,
              "parameters": total, "build_s": round(built_s, 1), "rss_after_build_gb": round(built_rss, 2),
              "step_s": round(time.time() - step_start, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
              "loss": round(float(loss.detach() / tokens), 4), "torch": torch.__version__}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
