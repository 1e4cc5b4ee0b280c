"""Offline batched generation: our continuous engine beside vLLM's CPU build on the same GLM-4 shapes.

    python -m benchmarks.vllm_compare                                   # ours only
    python -m benchmarks.vllm_compare --vllm-python PEER/vllm/bin/python \\
        --vllm-script ../shared/peers/vllm_cpu/bench_offline.py --vllm-model PEER/glm4-tiny

Both sides run the same workload, which is the peer script's: a warm-up, then 1, 16 and 64 prompts of 128
random token ids, 64 new tokens each, greedy, no stop token, all submitted at once; answer tokens per
second of wall time. Our model is the GLM-4 decoder of GLM-4V-9B with the peer's `Glm4Config` sizes
(vocabulary 32,000, hidden 1,024, 8 layers, 16 query heads, 2 key/value groups of 64, MLP 2,816, QKV bias),
random bf16 weights; vLLM runs transformers' `Glm4ForCausalLM` of those sizes (GLM-4-0414's layer, which adds
two norms per layer: the same matmuls within 0.1%). vLLM is a separate virtualenv (see the peer's README)
and never a dependency; without `--vllm-python` only our side runs. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import time

import torch

from visualglm.checkpoint.tiny import init_random_weights
from visualglm.config import GLM4VConfig
from visualglm.generation.continuous import ContinuousEngine, EngineRequest
from visualglm.generation.engine import GenerationParams
from visualglm.models.glm4 import GLM4ForCausalLM

COUNTS = (1, 16, 64)
PROMPT, ANSWER, VOCAB = 128, 64, 32000


def glm4_like_peer() -> torch.nn.Module:
    config = GLM4VConfig(padded_vocab_size=VOCAB, vocab_size=VOCAB, hidden_size=1024, ffn_hidden_size=2816,
                         kv_channels=64, num_attention_heads=16, num_layers=8, multi_query_group_num=2,
                         seq_length=1024, eos_token_id=[2], pad_token_id=0)
    model = GLM4ForCausalLM(config)  # the decoder alone: the peer's model has no vision tower
    init_random_weights(model, weight_scale=1.0)
    return model.to(torch.bfloat16).eval()


def run_ours(rows: int) -> list[str]:
    torch.manual_seed(0)
    model = glm4_like_peer()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    lines = [f"ours: GLM-4 decoder {params:.0f}M parameters, bf16, {torch.get_num_threads()} threads, "
             f"max rows {rows}"]
    engine = ContinuousEngine(model, max_rows=rows, context=PROMPT + ANSWER + 1)
    rng = random.Random(0)
    generation = GenerationParams(max_new_tokens=ANSWER)

    def generate(count: int) -> tuple[float, int]:
        for index in range(count):
            engine.submit(EngineRequest((count, index), [rng.randrange(3, VOCAB) for _ in range(PROMPT)],
                                        generation))
        started, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += sum(event.token is not None for event in engine.step())
        return time.perf_counter() - started, tokens

    generate(1)  # warm-up
    for count in COUNTS:
        wall, tokens = generate(count)
        lines.append(f"ours N={count} wall_s={wall:.3f} out_tokens={tokens} out_tok_per_s={tokens / wall:.1f}")
    lines.append(f"ours maxrss_GiB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")
    return lines


def run_vllm(python: str, script: str, model: str, rows: int) -> list[str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
           "MAX_NUM_SEQS": str(rows)}
    started = time.perf_counter()
    done = subprocess.run([python, script, model], capture_output=True, text=True, env=env, timeout=1200)
    lines = [f"vllm {line}" for line in done.stdout.splitlines() if line.startswith(("N=", "load_s", "maxrss"))]
    if done.returncode != 0:
        lines.append(f"vllm failed with status {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    lines.append(f"vllm process wall {time.perf_counter() - started:.0f} s (start-up included)")
    return lines


def _rates(lines: list[str], prefix: str) -> dict[int, float]:
    rates = {}
    for line in lines:
        if line.startswith(f"{prefix} N="):
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            rates[int(fields["N"])] = float(fields["out_tok_per_s"])
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows decoded together (vLLM: max_num_seqs)")
    parser.add_argument("--vllm-python", help="the python of vLLM's own virtualenv")
    parser.add_argument("--vllm-script", help="the peer's bench_offline.py")
    parser.add_argument("--vllm-model", help="the peer's random GLM-4 folder (make_random_glm4.py)")
    args = parser.parse_args()
    peer = [args.vllm_python, args.vllm_script, args.vllm_model]
    if any(peer) and not all(peer):
        parser.error("--vllm-python, --vllm-script and --vllm-model go together")
    for path in filter(None, peer):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist (see ../shared/peers/vllm_cpu/README.md to set vLLM up)")
    ours = run_ours(args.rows)
    print("\n".join(ours), flush=True)
    if not all(peer):
        print("vLLM not run (no --vllm-python/--vllm-script/--vllm-model)")
        return 0
    theirs = run_vllm(*peer, args.rows)
    print("\n".join(theirs), flush=True)
    mine, other = _rates(ours, "ours"), _rates(theirs, "vllm")
    for count in COUNTS:
        if count in mine and count in other:
            print(f"N={count}: ours {mine[count]:.1f} tok/s, vLLM {other[count]:.1f} tok/s, "
                  f"ours / vLLM {mine[count] / other[count]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
