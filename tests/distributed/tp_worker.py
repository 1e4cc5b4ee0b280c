"""Runs the tensor-parallel test cases; under torchrun each rank saves what it computed.

``python -m torch.distributed.run --nproc-per-node 2 tests/distributed/tp_worker.py OUT_DIR CASES_JSON``
writes ``OUT_DIR/rank{r}.pt``; ``run_cases`` called in a plain process gives the single-process reference.
Each case loads a checkpoint, records the logits of every greedy step (prefill and decode through the KV
cache) and the texts of a two-turn greedy chat (which reuses the cache and, for image models, one encoded
image).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from visualglm.checkpoint.load import apply_quantization, load
from visualglm.checkpoint.tokenizer import load_tokenizer
from visualglm.generation.chat import ChatSession
from visualglm.generation.engine import GenerationParams, generate_steps
from visualglm.generation.sampling import SamplingParams
from visualglm.quant.linear import Int4Linear, Int8Linear

NEW_TOKENS = 6


def run_case(case: dict, tensor_parallel: bool) -> dict:
    """case: ``{"path", "image"?, "quant"?: 8, "quant_then_split"?: bool, "dtype"?, "ids"?}``."""
    dtype = case.get("dtype", "float32")
    # fp32 dequantized matmuls: the CPU int8 kernel rounds activations and outputs to bf16, which would
    # hide the comparison under rounding noise.
    Int8Linear.backend = Int4Linear.backend = case.get("quant_backend", "dequant")
    if case.get("quant_then_split"):  # quantize the full model, then slice the quantized tensors
        model = load(case["path"], dtype=dtype, progress=False, fast_cpu_kernels=False)
        apply_quantization(model, case["quant"])
        if tensor_parallel:
            from visualglm.distributed.tp import apply_tensor_parallel

            apply_tensor_parallel(model)
    else:
        model = load(case["path"], dtype=dtype, progress=False, quantize=case.get("quant"),
                     tensor_parallel=tensor_parallel)
    if "ids" in case:  # a checkpoint without a tokenizer: the logits of one forward pass
        with torch.inference_mode():
            return {"logits": model(torch.tensor([case["ids"]])).float()}
    tokenizer = load_tokenizer(case["path"])
    session = ChatSession(model, tokenizer, sampling=SamplingParams(do_sample=False), max_new_tokens=NEW_TOKENS)
    if case.get("image"):
        session.set_image(case["image"])
    ids, image_start = session.prompt_ids("What is in the picture? 你好")
    embeds = None
    if image_start is not None:
        with torch.inference_mode():
            embeds = model.embed_with_images(torch.tensor([ids]), session._image_embeds, [image_start])
    steps = list(generate_steps(model, [ids], params=GenerationParams(max_new_tokens=NEW_TOKENS),
                                inputs_embeds=embeds))
    texts = [session.chat("hello there"), session.chat("and what now? 再说一遍")]
    return {"logits": torch.stack([s.logits[0] for s in steps]), "tokens": [int(s.tokens[0]) for s in steps],
            "texts": texts, "cache_heads": model.attention_modules()[0].kv_cache.k.shape[1]}


def run_cases(cases: dict[str, dict], tensor_parallel: bool = False) -> dict[str, dict]:
    return {name: run_case(case, tensor_parallel) for name, case in cases.items()}


def main() -> None:
    from visualglm.distributed.launch import init_from_env

    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))
    context = init_from_env("cpu", quiet_workers=False)
    torch.manual_seed(0)
    results = run_cases(cases, tensor_parallel=context is not None)
    rank = 0 if context is None else context.rank
    torch.save(results, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    from visualglm.distributed.launch import exit_process

    main()
    exit_process(0)  # leaves the process group with the other rank (what `python -m visualglm` does)
