"""Logit error of weight-only INT8 / INT4 against float32, on the golden tiny models.

For every case of every folder under the golden directory (chatglm-6b, visualglm-6b, glm-4v-9b), the prompt
logits (last 3 positions) of the model loaded in float32 with ``quantize=8`` / ``quantize=4`` are compared
with the reference's float32 logits stored there. VisualGLM and GLM-4V cases take the stored input
embeddings (image spliced in), so only the quantized language model differs. Prints, per model and width, the
largest absolute error, that error relative to the largest |logit|, and the relative L2 error; "+out" rows
also quantize the output layer (``quantize_also=("output",)``: an INT8 copy where it is tied to the
embeddings). ``--dtype bfloat16`` runs the models on this CPU's bf16 decode kernels. The last column is what
the kernels add on their own: the largest logit difference between the quantized model and the same
weights dequantized into plain linears (the exact weight-only result), relative to the largest |logit|,
for the load-time CPU kernels (``visualglm.checkpoint.cpu_kernels``: oneDNN, the AMX build; the plan is
printed first) and for PyTorch's own kernels (``fast_cpu_kernels=False``).

These are tiny random models (hidden 64): the figures show the scheme works end to end, not the error of
the full-size models, whose rows are 4096 wide.
Run: .venv/bin/python -m benchmarks.quant_accuracy [--golden DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import visualglm
from visualglm.config import read_config
from visualglm.peft import dequantize_model

DEFAULT_GOLDEN = Path(__file__).resolve().parent.parent.parent / "shared" / "golden"


def _strip_left_pad(row: list[int], pad_id: int) -> list[int]:
    start = 0
    while start < len(row) and row[start] == pad_id:
        start += 1
    return row[start:]


def case_logits(model: torch.nn.Module, family: str, case: dict, expected: dict) -> torch.Tensor:
    """The model's logits at the positions the golden file stores, ``[B, 3, vocab]``."""
    name = case["name"]
    want = expected[f"{name}.logits_last3"]
    with torch.no_grad():
        if family == "chatglm":
            from visualglm.generation.engine import left_pad

            prompts = [_strip_left_pad(row, model.config.pad_token_id) for row in case["input_ids"]]
            ids, num_pad = left_pad(prompts, model.config.pad_token_id)
            positions, allowed = model.prompt_inputs(ids, num_pad)
            logits = model(ids, positions, allowed)
        elif family == "visualglm":
            ids = torch.tensor(case["input_ids"])
            positions, allowed = model.prompt_inputs(ids)
            embeds = model.embed_with_images(ids, expected["image.image_embeds"], [case["image_span"][0]])
            logits = model(ids, positions, allowed, inputs_embeds=embeds)
        else:
            ids, _ = model.expand_image_placeholders(case["input_ids"][0])
            tokens = torch.tensor([ids])
            positions, allowed = model.prompt_inputs(tokens)
            embeds = expected[f"{name}.encoder_input_embeds"].to(next(model.parameters()).dtype)
            logits = model(tokens, positions, allowed, inputs_embeds=embeds)
    return logits[:, -want.shape[1]:].float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN, help="golden directory")
    parser.add_argument("--dtype", default="float32",
                        help="dtype to load in (bfloat16 runs this CPU's bf16 decode kernels; default float32)")
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.golden.iterdir() if (p / "cases.json").is_file())
    from visualglm.checkpoint.cpu_kernels import plan_cpu_kernels
    from visualglm.kernels.machine import cpu_summary

    print(f"CPU: {cpu_summary()}\nkernels: {plan_cpu_kernels().describe()}")
    print(f"{'model':14s} {'weights':12s} {'max |err|':>10s} {'/ max|logit|':>13s} {'rel L2':>8s}  cases  "
          "kernel error: load-time / PyTorch's")
    for folder in folders:
        family = read_config(folder).family
        cases = json.loads((folder / "cases.json").read_text(encoding="utf-8"))["cases"]
        expected = load_file(folder / "expected.safetensors")
        # "+out": the output layer quantized too (GLM-4V-9B) or given an INT8 copy (tied, the other two).
        for quantize, also in ((None, ()), (8, ()), (4, ()), (8, ("output",)), (4, ("output",))):
            model = visualglm.load(folder, dtype=args.dtype, progress=False, quantize=quantize,
                                   quantize_also=also)
            plain = visualglm.load(folder, dtype=args.dtype, progress=False, quantize=quantize,
                                   quantize_also=also, fast_cpu_kernels=False)
            exact = copy.deepcopy(plain)
            dequantize_model(exact, getattr(torch, args.dtype))  # (a tied output layer's INT8 copy stays)
            max_err = scale = sq_err = sq_ref = fast_err = plain_err = 0.0
            for case in cases:
                want = expected[f"{case['name']}.logits_last3"].float()
                got = case_logits(model, family, case, expected)
                reference = case_logits(exact, family, case, expected)
                fast_err = max(fast_err, (got - reference).abs().max().item())
                plain_err = max(plain_err, (case_logits(plain, family, case, expected) - reference).abs().max().item())
                max_err = max(max_err, (got - want).abs().max().item())
                scale = max(scale, want.abs().max().item())
                sq_err += (got - want).pow(2).sum().item()
                sq_ref += want.pow(2).sum().item()
            label = args.dtype if quantize is None else f"int{quantize}" + ("/g64" if quantize == 4 else "")
            label += "+out" if also else ""
            print(f"{folder.name:14s} {label:12s} {max_err:10.4f} {max_err / scale:13.4f} "
                  f"{(sq_err / sq_ref) ** 0.5:8.4f}  {len(cases):5d}  {fast_err / scale:.1e} / {plain_err / scale:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
