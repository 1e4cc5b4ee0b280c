"""Decode steps of a continuous batch under each CPU kernel for their attention, in one process.

    python -m benchmarks.decode_attention                 # 151M random ChatGLM and 154M random GLM-4 decoder
    python -m benchmarks.decode_attention --models wide   # 2 layers of ChatGLM-6B's width (32 heads of 128)
    python -m benchmarks.decode_attention --models chatglm6b --batches 8x600 --kernels fresh,copied,native --rounds 2
                                                          # full-size random ChatGLM-6B (12.4 GB in bf16)

A decode step attends over a slice of each slot's cache (``[rows, heads, context, dim][:, :, :longest + 1]``),
a strided view. For a few batches (rows x cached tokens) it times the engine's decode steps with the
attention computed as

- ``strided``: two matmuls on the strided view (what the engine did before it copied: PyTorch's 16-bit
  batched matmul takes a slow path on such views),
- ``padded``: two matmuls on contiguous copies of the whole batch (every row as long as the longest),
- ``fresh``: the matmuls on contiguous copies made in fresh memory each time (the kernel before it kept its
  copy buffers: large fresh tensors pay page faults), row by row as ``copied``,
- ``copied``: the engine's "matmul" kernel now: the copies go into memory kept between layers and steps
  (``layers._KeptCopies``), the whole batch at once or row by row over each row's own slots when the
  rows' lengths differ enough (``layers.RAGGED_MATMUL_MIN_SAVED_BYTES``),
- ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (the "sdpa" kernel),
- ``native``: the optional compiled kernel reading the strided cache in place
  (``visualglm.kernels.strided_attention``), where ``python -m visualglm.kernels.native build`` built it,

alternating between them every 6 steps (8 rounds) so that the machine's drift hits each alike; medians.
Which kernel a model gets is chosen at load time (``visualglm.checkpoint.cpu_kernels``); this prints what the
choice rests on for this CPU. Every figure is printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import visualglm
from benchmarks.serve_load import GLM4_SHAPE, MID_SHAPE
from visualglm.bench import random_model
from visualglm.checkpoint.tiny import write_tiny_random_checkpoint
from visualglm.generation.continuous import ContinuousEngine, EngineRequest
from visualglm.generation.engine import GenerationParams
from visualglm.generation.sampling import SamplingParams
from visualglm.kernels import strided_attention
from visualglm.kernels.machine import cpu_facts
from visualglm.models import layers

# Each row's cached tokens: equal rows, then rows of very different lengths (a serving mix).
BATCHES = ((16,), (600,), (300,) * 3, (200,) * 8, (600,) * 8, (600, 100, 40, 20), (500,) + (60,) * 3 + (30,) * 4)
KERNELS = ("strided", "padded", "fresh", "copied", "sdpa")
# Two layers of ChatGLM-6B at its full width: its attention reads 8x the bytes per token of ``mid``'s.
WIDE_SHAPE = dict(hidden_size=4096, num_layers=2, num_attention_heads=32, inner_hidden_size=16384)


def _fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layers._single_query_attention`` as it was before its copy buffers: fresh ``contiguous()`` copies."""
    if k.dtype != torch.float32 and not (k.is_contiguous() and v.is_contiguous()):
        ends = layers._row_ends(bias, k, layers.RAGGED_MATMUL_MIN_SAVED_BYTES)
        if ends is not None:
            return layers._row_by_row(_fresh, q, k, v, bias, ends)
        k, v = k.contiguous(), v.contiguous()
    return layers._matmul_attention(q, k, v, bias)


def parse_batches(text: str) -> tuple[tuple[int, ...], ...]:
    """"8x600,600/100/40" -> ((600,) * 8, (600, 100, 40)): rows x tokens, or each row's tokens."""
    batches = []
    for item in text.split(","):
        rows, _, tokens = item.partition("x")
        batches.append((int(tokens),) * int(rows) if tokens else tuple(int(t) for t in item.split("/")))
    return tuple(batches)


def measure(name: str, model, rounds: int, seed: int, batches: tuple[tuple[int, ...], ...] = BATCHES,
            kernels_asked: tuple[str, ...] | None = None) -> None:
    rng = random.Random(seed)
    config = model.config
    greedy = SamplingParams(do_sample=False)
    copied, ragged = layers._single_query_attention, layers.RAGGED_MATMUL_MIN_SAVED_BYTES
    kernels = {"strided": layers._matmul_attention, "fresh": _fresh}  # the others: the engine's own kernel
    kernels_here = KERNELS + (("native",) if strided_attention.available() else ())
    kernels_here = tuple(k for k in kernels_here if kernels_asked is None or k in kernels_asked)
    print(f"\n{name}: decode step, median ms ({rounds} rounds of 6 steps per kernel)", flush=True)
    for lengths in batches:
        engine = ContinuousEngine(model, max_rows=8, context=2048, prefill_chunk=4096)
        for row, length in enumerate(lengths):
            ids = [rng.randrange(20, 480) for _ in range(length)]
            if config.family != "glm4v":  # ChatGLM prompts end with [gMASK] <sop>
                ids += [config.gmask_token_id, config.bos_token_id]
            engine.submit(EngineRequest(row, ids, GenerationParams(max_new_tokens=8 * rounds * 8, sampling=greedy,
                                                                   stop_ids=())))
        for _ in range(3):
            engine.step()
        times: dict[str, list[float]] = {kernel: [] for kernel in kernels_here}
        try:
            for _ in range(rounds):
                for kernel in kernels_here:
                    layers._single_query_attention = kernels.get(kernel, copied)
                    layers.RAGGED_MATMUL_MIN_SAVED_BYTES = 1 << 62 if kernel == "padded" else ragged
                    for attention in model.attention_modules():
                        attention.single_query = {"sdpa": "sdpa", "native": strided_attention.attend}.get(kernel,
                                                                                                         "matmul")
                    engine.step()  # the first step after a switch is not timed
                    for _ in range(6):
                        start = time.perf_counter()
                        engine.step()
                        times[kernel].append((time.perf_counter() - start) * 1e3)
        finally:
            layers._single_query_attention, layers.RAGGED_MATMUL_MIN_SAVED_BYTES = copied, ragged
            engine.close()
        shape = f"{len(lengths)} x {lengths[0]}" if len(set(lengths)) == 1 else "/".join(map(str, lengths))
        print(f"  rows of {shape} tokens: " +
              ", ".join(f"{kernel} {statistics.median(values):.1f}" for kernel, values in times.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mid,glm4",
                        help="mid (151M ChatGLM), glm4 (154M GLM-4 decoder), wide (2 ChatGLM-6B-wide layers), "
                        "chatglm6b (full size)")
    parser.add_argument("--batches", help="e.g. 8x600,1x16,600/100/40/20 (rows x cached tokens, or each row's; "
                        "default: the built-in list)")
    parser.add_argument("--kernels", help=f"a subset of {','.join(KERNELS)},native (default: all available)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    facts = cpu_facts()
    print(f"CPU: {facts.name} ({facts.capability}); torch threads {torch.get_num_threads()}; bf16; compiled "
          f"attention: {'built' if strided_attention.available() else 'not built'}")
    try:
        batches = parse_batches(args.batches) if args.batches else BATCHES
    except ValueError:
        parser.error(f"--batches {args.batches!r}: expected items like 8x600 or 600/100/40")
    kernels = tuple(args.kernels.split(",")) if args.kernels else None
    if kernels and set(kernels) - {*KERNELS, "native"}:
        parser.error(f"--kernels: unknown {sorted(set(kernels) - {*KERNELS, 'native'})}")
    with tempfile.TemporaryDirectory(prefix="visualglm-decode-attention-") as work:
        for name in args.models.split(","):
            if name == "chatglm6b":  # random weights of the real shapes, on the CPU kernels loading applies
                model = random_model("chatglm-6b", torch.bfloat16)
            else:
                shape = {"mid": MID_SHAPE, "glm4": dict(family="glm4v", **GLM4_SHAPE), "wide": WIDE_SHAPE}.get(name)
                if shape is None:
                    parser.error(f"unknown model {name!r}")
                path = write_tiny_random_checkpoint(Path(work) / name, **shape)
                model = visualglm.load(str(path), dtype=torch.bfloat16, progress=False)
            measure(name, model, args.rounds, args.seed, batches, kernels)
            del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
