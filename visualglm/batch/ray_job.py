"""The same batch job on a Ray cluster: Ray Data streams the rows through an actor pool of model replicas.

``read_text`` (one row per JSONL line; the rows of a folder of images come from the driver) ->
``map_batches`` with :class:`Replica`, a pool of ``replicas`` actors each holding a model
(:class:`~visualglm.batch.runner.BatchRunner`, the local path's engine loop, on ``gpus_per_replica`` GPU or
``cpus_per_replica`` CPUs) -> the records come back to the driver, which writes them as shards renamed into
place (:class:`~visualglm.batch.output.ShardWriter`). A replica that dies is restarted and its batch
retried by Ray Data (its default for actor pools: no limit); a job that stops is resumed by running it
again (ids in finished shards are skipped).

The rows are read as text and parsed by the replica with the local path's parser, not with
``read_json``: Ray's JSON reader makes a table of the rows, which turns ``"top_k": 50`` into ``50.0`` in a
column where other rows lack it, rounds integers past 2**53 (seeds), and fails on a column whose type
changes from row to row; the same line must give the same row on one machine or many.

On a cluster of several machines the input file, the images and the output folder must be on storage
every node sees at the same path (the driver resolves paths before sending them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visualglm.batch.inputs import id_key, parse_object, parse_row
from visualglm.batch.job import JobSummary, ModelSpec, load_model, open_input, progress_bar, take_record
from visualglm.batch.output import ShardWriter
from visualglm.batch.runner import BatchRunner, BatchSettings

DEFAULT_ADDRESS = None  # `--ray` alone: ray.init()'s own choice (RAY_ADDRESS, a local cluster, or a new one)


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeError("ray is not installed: install the extra with pip install 'visualglm[ray]'") from None
    return ray


@dataclass
class RayOptions:
    """Where and how wide: ``address`` of the cluster (None: see :data:`DEFAULT_ADDRESS`), ``replicas``
    (None: one per GPU with a CUDA device, else cluster CPUs // ``cpus_per_replica``), the resources of
    one replica, and the rows handed to a replica per task (None: 4 x batch size)."""

    address: str | None = DEFAULT_ADDRESS
    replicas: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None  # None: 1 with a CUDA device, else 0
    rows_per_task: int | None = None


class Replica:
    """One model replica of the actor pool: ``__call__`` answers a batch of JSONL lines."""

    def __init__(self, spec: ModelSpec, settings: BatchSettings, base_dir: str, prompt: str | None,
                 done: frozenset[str], threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        model, tokenizer = load_model(spec, progress=False)
        self.runner = BatchRunner(model, tokenizer, settings, base_dir=base_dir)
        self.prompt = prompt
        self.done = done

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = []
        for text in batch["text"]:
            if not str(text).strip():
                continue
            row = parse_row(parse_object(str(text), "input row"), self.prompt)
            if row.key not in self.done:
                rows.append(row)
        lines = [json.dumps(record, ensure_ascii=False) for record in self.runner.run(rows)]
        return {"record": np.array(lines, dtype=object)}


def _cluster_replicas(ray, options: RayOptions, gpus: float) -> int:
    resources = ray.cluster_resources()
    if gpus > 0:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // options.cpus_per_replica))


def run_batch_on_ray(input_path: str | Path, output: str | Path, *, spec: ModelSpec | None = None,
                     settings: BatchSettings | None = None, prompt: str | None = None,
                     options: RayOptions | None = None, progress: bool = True, flush_rows: int = 1000,
                     flush_seconds: float = 30.0, on_record: Callable[[dict], None] | None = None) -> JobSummary:
    """Answer every row of ``input_path`` not yet in the shard folder ``output``, on Ray (connects to
    ``options.address``, or uses the Ray already initialised in this process); ``on_record`` is called
    with each record as it is written."""
    ray = require_ray()
    started = time.perf_counter()
    settings = (settings or BatchSettings()).validate()
    spec = (spec or ModelSpec()).absolute()
    options = options or RayOptions()
    if options.replicas is not None and options.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {options.replicas}")
    if options.cpus_per_replica <= 0:
        raise ValueError("--cpus-per-replica must be positive")
    job = open_input(input_path, prompt)
    with ShardWriter(output, flush_rows=flush_rows, flush_seconds=flush_seconds) as writer:
        done = frozenset(writer.done_keys() & set(job.keys))
        summary = JobSummary(len(job.keys), len(done), 0, 0, 0.0)
        if len(done) < len(job.keys):
            if not ray.is_initialized():
                ray.init(address=options.address, logging_level="WARNING")
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # ours counts rows; Ray's count blocks
            gpus = options.gpus_per_replica
            if gpus is None:
                gpus = 1.0 if spec.device.startswith("cuda") else 0.0
            replicas = options.replicas or _cluster_replicas(ray, options, gpus)
            if job.folder is not None:
                dataset = ray.data.from_items([{"text": json.dumps(row)} for row in job.folder
                                               if id_key(row["id"]) not in done])
            else:  # reading lines is light: no CPU reserved for it, or the replicas could take them all
                dataset = ray.data.read_text(str(job.path.resolve()), num_cpus=0)
            dataset = dataset.map_batches(
                Replica, batch_size=options.rows_per_task or 4 * settings.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=options.cpus_per_replica,
                num_gpus=gpus, fn_constructor_kwargs=dict(
                    spec=spec, settings=settings, base_dir=str(job.base_dir), prompt=prompt, done=done,
                    threads=max(1, int(options.cpus_per_replica))))
            bar = progress_bar(len(job.keys), progress, initial=len(done))
            try:
                for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
                    for line in batch["record"]:
                        take_record(json.loads(line), writer, summary, bar, on_record)
            except ray.exceptions.RayError as exc:
                raise RuntimeError(f"the Ray job failed: {_first_line(exc)} (finished shards are kept: rerun "
                                   "the same command to resume)") from exc
            finally:
                bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _first_line(exc: BaseException) -> str:
    cause = exc
    while getattr(cause, "cause", None) is not None:  # RayTaskError wraps the replica's own exception
        cause = cause.cause
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
