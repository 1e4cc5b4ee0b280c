"""Step times of the continuous engine while a newcomer's prefill runs beside decoding rows.

    python -m benchmarks.engine_steps                     # 151M random ChatGLM (hidden 1024, 12 layers), bf16
    python -m benchmarks.engine_steps --prefill-chunk 16
    python -m benchmarks.engine_steps --model glm4        # 154M random GLM-4V decoder (2 key/value groups)

7 rows decode (128-token prompts); then newcomers of 16, 128 and 512 prompt tokens arrive one at a time.
For each, the time of every step until it has joined the decode batch is printed, with the prefill's stages
run inside the decode forward (the engine's default) and as forwards of their own (``join_prefill=False``),
beside the median step of the 7 rows alone. A 512-token prompt's stages are pieces of layers, which always
run on their own. Every figure is printed; nothing is asserted.
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
from visualglm.checkpoint.tiny import write_tiny_random_checkpoint
from visualglm.generation.continuous import ContinuousEngine, EngineRequest
from visualglm.generation.engine import GenerationParams
from visualglm.generation.sampling import SamplingParams

NEWCOMERS = (16, 128, 512)


def _steps(engine: ContinuousEngine, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(model, chunk: int, join: bool, seed: int) -> None:
    rng = random.Random(seed)
    config = model.config
    greedy = SamplingParams(do_sample=False)

    def request(key: str, tokens: int, answer: int) -> EngineRequest:
        ids = [rng.randrange(20, 480) for _ in range(tokens)]
        if config.family != "glm4v":  # ChatGLM prompts end with [gMASK] <sop>
            ids += [config.gmask_token_id, config.bos_token_id]
        return EngineRequest(key, ids, GenerationParams(max_new_tokens=answer, sampling=greedy, stop_ids=()))

    engine = ContinuousEngine(model, max_rows=8, context=2048, prefill_chunk=chunk, join_prefill=join)
    engine.submit(request("warm-up", 16, 4))
    _steps(engine, 6)
    for row in range(7):
        engine.submit(request(f"row {row}", 128, 400))
    _steps(engine, 40)
    alone = statistics.median(_steps(engine, 20))
    print(f"prefill stages {'inside the decode forward' if join else 'as forwards of their own'}, "
          f"--prefill-chunk {chunk}: 7 rows alone {alone:.1f} ms a step")
    for tokens in NEWCOMERS:
        key = f"newcomer {tokens}"
        engine.submit(request(key, tokens, 2))
        times: list[float] = []
        first = False
        while not first:  # until the newcomer's first token
            start = time.perf_counter()
            events = engine.step()
            times.append((time.perf_counter() - start) * 1e3)
            first = any(event.id == key and event.token is not None for event in events)
        print(f"  newcomer of {tokens} tokens: {len(times)} steps, ms " + " ".join(f"{t:.0f}" for t in times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("mid", "glm4"), default="mid",
                        help="serve_load's mid model (ChatGLM) or its glm4 model (GLM-4V decoder)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as work:
        if args.model == "glm4":
            path = write_tiny_random_checkpoint(Path(work) / "glm4", family="glm4v", **GLM4_SHAPE)
            name = "random GLM-4V decoder 154M"
        else:
            path = write_tiny_random_checkpoint(Path(work) / "mid", **MID_SHAPE)
            name = "random ChatGLM 151M"
        model = visualglm.load(str(path), dtype=torch.bfloat16, progress=False)
        print(f"{name}, bf16, {torch.get_num_threads()} threads")
        for join in (True, False):
            measure(model, args.prefill_chunk, join, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
