"""Rows per second of ``visualglm batch``: local vs Ray (1 and 2 replicas), batch sizes 1 / 8 / 32.

Two models: the shipped demo model (easy-VQA answers: one or two tokens) and a tiny random VisualGLM
(random weights: it rarely picks the end id, so every answer runs to ``--max-new-tokens``). The data set:
``--rows`` questions about ``--images`` distinct drawn images (easy-VQA style, several questions per
image), sampled with a fixed seed.

Each run is a whole job as a user starts it, written to a fresh output: the local path loads the model
in the run (``job s`` includes it), a Ray run starts its replicas' actors and loads their models inside
(``job s`` includes that). ``steady rows/s`` counts the rows that came after the first result over the
time after it, i.e. without start-up (a Ray task's rows reach the driver together). Ray runs on
``ray.init(num_cpus=CPUS)`` in this process: 1 replica with all
CPUs, or 2 replicas with half each. Every run's answers are checked to equal the local batch-size-1 run's
(same seed: the answers do not depend on batching or replicas).

    flock /tmp/visualglm-cpu.lock .venv/bin/python benchmarks/batch_throughput.py [--rows 96] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from visualglm.batch import BatchSettings, ModelSpec, RayOptions, read_results, run_batch, run_batch_on_ray

QUESTIONS = ("What shape is in the image?", "What color is the shape?", "Is there a circle in the image?",
             "Is the shape red?", "Does the image contain a triangle?")


def write_data(folder: Path, rows: int, images: int, seed: int = 0) -> Path:
    from visualglm.demo.draw import random_drawing

    rng = random.Random(seed)
    for i in range(images):
        random_drawing(rng)[0].save(folder / f"img-{i:04d}.png")
    path = folder / "rows.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            row = {"id": i, "image": f"img-{rng.randrange(images):04d}.png", "prompt": rng.choice(QUESTIONS)}
            handle.write(json.dumps(row) + "\n")
    return path


class Timed:
    """When each record came (``note`` is the jobs' ``on_record``)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def note(self, record: dict) -> None:
        self.times.append(time.perf_counter())

    @property
    def steady(self) -> float:
        """Rows per second after start-up: the rows that came after the first arrival (a Ray task's rows
        arrive together), over the time from the first arrival to the last."""
        if not self.times:
            return 0.0
        first, last = self.times[0], self.times[-1]
        later = sum(t > first + 1e-3 for t in self.times)
        return later / (last - first) if later else 0.0


def run_once(kind: str, source: Path, work: Path, spec: ModelSpec, settings: BatchSettings, replicas: int,
             cpus: int) -> dict:
    timer = Timed()
    out = work / f"{kind}-{replicas}-{settings.batch_size}-{time.monotonic_ns()}"
    started = time.perf_counter()
    if kind == "local":
        out = out.with_suffix(".jsonl")
        summary = run_batch(source, out, spec=spec, settings=settings, progress=False, on_record=timer.note)
    else:
        summary = run_batch_on_ray(source, out, spec=spec, settings=settings, progress=False, on_record=timer.note,
                                   options=RayOptions(replicas=replicas, cpus_per_replica=cpus // replicas))
    seconds = time.perf_counter() - started
    results = read_results(out)
    tokens = sum(record.get("completion_tokens", 0) for record in results.values())
    return {"rows": summary.written, "errors": summary.errors, "job_s": seconds,
            "rows_per_s": summary.written / seconds, "steady_rows_per_s": timer.steady, "tokens": tokens,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--models", default="demo,tiny-random")
    parser.add_argument("--no-ray", action="store_true", help="local runs only")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    ray_ready = False
    if not args.no_ray:
        try:
            import ray

            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
            ray_ready = True
        except ImportError:
            print("ray is not installed: local runs only (pip install 'visualglm[ray]')", file=sys.stderr)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = write_data(work, args.rows, args.images)
        models = {}
        if "demo" in args.models:
            models["demo"] = ModelSpec()
        if "tiny-random" in args.models:
            from visualglm.checkpoint.tiny import write_tiny_random_checkpoint

            models["tiny-random"] = ModelSpec(str(write_tiny_random_checkpoint(work / "tiny", family="visualglm")))
        for name, spec in models.items():
            reference = None
            runs = [("local", 1)] + ([("ray", 1), ("ray", 2)] if ray_ready else [])
            for kind, replicas in runs:
                for size in sizes:
                    settings = BatchSettings(batch_size=size, seed=0, max_new_tokens=args.max_new_tokens)
                    result = run_once(kind, source, work, spec, settings, replicas, cpus)
                    results = result.pop("results")
                    reference = reference or results
                    row = {"model": name, "path": "local" if kind == "local" else f"ray x{replicas}",
                           "batch": size, **result, "same_answers": results == reference}
                    table.append(row)
                    print(f"{name:12s} {row['path']:8s} batch {size:3d}: {row['rows']} rows in {row['job_s']:6.1f} s "
                          f"= {row['rows_per_s']:6.2f} rows/s (steady {row['steady_rows_per_s']:6.2f}), "
                          f"{row['tokens'] / row['job_s']:7.1f} answer tokens/s, same answers: {row['same_answers']}",
                          flush=True)
    print()
    print("| model | path | batch size | job s | rows/s (whole job) | rows/s (steady) | answer tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['model']} | {row['path']} | {row['batch']} | {row['job_s']:.1f} | {row['rows_per_s']:.2f} | "
              f"{row['steady_rows_per_s']:.2f} | {row['tokens'] / row['job_s']:.1f} |")
    print(f"\n{args.rows} rows, {args.images} images, max {args.max_new_tokens} new tokens, seed 0; torch "
          f"{torch.__version__}, {cpus} CPUs")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0 if all(row["same_answers"] for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
