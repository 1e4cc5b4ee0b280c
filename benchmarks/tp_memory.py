"""Per-rank peak memory of tensor-parallel loading: full-size ChatGLM-6B on 1 process and on N.

Writes a random ChatGLM-6B checkpoint (bf16 safetensors shards, ~12.4 GB) to a temporary directory, then
loads it once in a plain process and once under torch.distributed.run with N ranks (gloo, CPU), each rank
reading only its slices of the memory-mapped shards. Every process runs one forward over a short prompt
and reads every weight it holds, then reports its peak RSS (VmHWM). Prints the figures; asserts nothing.
The checkpoint is deleted afterwards unless ``--keep``; ``--dir`` with a checkpoint already there reuses it.

Usage: python -m benchmarks.tp_memory [--config chatglm-6b] [--nproc 2] [--dtype bfloat16] [--quantize 8]
                                      [--dir DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.load_memory import GIB, _vm, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def measure(directory: Path, dtype: str, quantize: int | None, out_dir: Path) -> None:
    """One process (or one rank): load, forward, read every weight; write ``rank{r}.json``."""
    import torch

    import visualglm
    from visualglm.distributed.launch import init_from_env

    context = init_from_env("cpu", quiet_workers=False)
    start = time.perf_counter()
    model = visualglm.load(directory, dtype=dtype, progress=False, quantize=quantize,
                           tensor_parallel=context is not None)
    load_s = time.perf_counter() - start
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    held = sum(t.numel() * t.element_size() for t in tensors)
    config = model.config
    prompt = torch.tensor([[5, 6, 7, config.gmask_token_id, config.bos_token_id]])
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(prompt, logits_to_keep=1)
        for tensor in tensors:  # touch every page this rank holds
            tensor.sum()
    forward_s = time.perf_counter() - start
    rank = 0 if context is None else context.rank
    figures = {"rank": rank, "world_size": 1 if context is None else context.world_size, "held_bytes": held,
               "peak_rss": _vm("VmHWM"), "load_seconds": load_s, "forward_seconds": forward_s,
               "vocab": int(logits.shape[-1])}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(figures))


def _run(command: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed ({done.returncode}):\n{done.stderr[-4000:]}")


def run_setting(directory: Path, nproc: int, dtype: str, quantize: int | None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="visualglm-tpmem-") as out:
        child = ["-m", "benchmarks.tp_memory", "--measure", str(directory), "--out", out, "--dtype", dtype,
                 *(["--quantize", str(quantize)] if quantize else [])]
        if nproc == 1:
            _run([sys.executable, *child], 1)
        else:
            _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                  *child], nproc)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="chatglm-6b", help="named config to write (default: chatglm-6b)")
    parser.add_argument("--nproc", type=int, default=2, help="tensor-parallel ranks to compare with 1 (default 2)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype to load into (default: bfloat16)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="quantize while loading")
    parser.add_argument("--dir", type=Path, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child / rank mode
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure, args.dtype, args.quantize, args.out)
        return 0

    directory = args.dir or Path(tempfile.mkdtemp(prefix="visualglm-tpmem-ckpt-"))
    try:
        if (directory / "config.json").is_file():
            written = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        else:
            written = write_random_checkpoint(directory, args.config, "bfloat16", 2 * GIB)
        results = {n: run_setting(directory, n, args.dtype, args.quantize) for n in (1, args.nproc)}
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps({"checkpoint_bytes": written, "results": results}))
        return 0
    print(f"{args.config}, checkpoint {written / GIB:.2f} GiB (bf16), loaded as {args.dtype}"
          + (f", INT{args.quantize}" if args.quantize else ""))
    print(f"{'ranks':>5} {'rank':>4} {'held GiB':>9} {'peak RSS GiB':>13} {'load s':>7} {'forward s':>9}")
    for n, ranks in results.items():
        for r in ranks:
            print(f"{n:>5} {r['rank']:>4} {r['held_bytes'] / GIB:>9.2f} {r['peak_rss'] / GIB:>13.2f} "
                  f"{r['load_seconds']:>7.1f} {r['forward_seconds']:>9.1f}")
    single = results[1][0]["peak_rss"]
    worst = max(r["peak_rss"] for r in results[args.nproc])
    print(f"largest rank's peak with {args.nproc} ranks / single process: {worst / single:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
