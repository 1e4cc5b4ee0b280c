"""A batch job on this machine: check the input, open the output, load the model, run, report.

:func:`run_batch` is what ``visualglm batch`` calls without ``--ray``. The order matters for a long job:
the whole input is checked (JSON objects, ids, duplicates) and the output opened (ids already done,
a torn tail cut off) before the model is loaded, so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visualglm.batch.inputs import BatchRow, folder_rows, id_key, parse_row, read_rows, scan
from visualglm.batch.output import AppendWriter
from visualglm.batch.runner import BatchRunner, BatchSettings

log = logging.getLogger("visualglm.batch")


@dataclass
class ModelSpec:
    """Which model a job loads, and how (the flags of ``--model/--dtype/--device/--quant/--adapter``)."""

    model: str | None = None  # None: the shipped demo model
    dtype: str | None = None
    device: str = "cpu"
    quant: int | None = None
    quant_also: tuple[str, ...] = ()
    adapter: str | None = None
    compile: bool = False

    def absolute(self) -> ModelSpec:
        """Local paths made absolute (a Ray worker may start in another folder)."""
        model = self.model
        if model and Path(model).exists():
            model = str(Path(model).resolve())
        adapter = str(Path(self.adapter).resolve()) if self.adapter else None
        return ModelSpec(model, self.dtype, self.device, self.quant, self.quant_also, adapter, self.compile)


def load_model(spec: ModelSpec, progress: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) of ``spec``: quantized while loading, the adapter applied, the decode step
    compiled when asked."""
    from visualglm.checkpoint.load import load
    from visualglm.checkpoint.tokenizer import load_tokenizer
    from visualglm.demo import resolve_model

    path = resolve_model(spec.model)
    tokenizer = load_tokenizer(path)
    model = load(path, dtype=spec.dtype, device=spec.device, quantize=spec.quant, quantize_also=spec.quant_also,
                 progress=progress)
    if spec.adapter:
        from visualglm.peft import apply_adapter

        apply_adapter(model, spec.adapter)
    if spec.compile:
        from visualglm.generation.engine import compile_decode

        compile_decode(model)  # picked up by the runner's engine
    return model, tokenizer


@dataclass
class JobInput:
    """A checked input: its rows' id keys, the folder relative image paths start from, and the rows."""

    path: Path
    keys: list[str]
    base_dir: Path
    folder: list[dict] | None  # the rows of a folder of images (None: a JSONL file)
    prompt: str | None

    def rows(self, skip: set[str] = frozenset()) -> Iterator[BatchRow]:
        source = (parse_row(value, self.prompt) for value in self.folder) if self.folder is not None else \
            read_rows(self.path, self.prompt)
        return (row for row in source if row.key not in skip)


def open_input(path: str | Path, prompt: str | None = None) -> JobInput:
    """Check ``path`` (a JSONL file, or a folder of images with ``prompt``) before anything runs."""
    path = Path(path)
    if path.is_dir():
        rows = folder_rows(path, prompt or "")
        return JobInput(path, [id_key(row["id"]) for row in rows], path.resolve(), rows, prompt)
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty")
    return JobInput(path, scan(path), path.resolve().parent, None, prompt)


@dataclass
class JobSummary:
    rows: int  # rows in the input
    skipped: int  # already in the output when the job started
    written: int  # records written by this run
    errors: int  # of which error records
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def line(self, output: str | Path) -> str:
        done = f"{self.written} rows written to {output} ({self.errors} errors)"
        skipped = f", {self.skipped} already done" if self.skipped else ""
        return f"{done}{skipped} in {self.seconds:.1f} s, {self.rows_per_second:.2f} rows/s"


def take_record(record: dict, writer, summary: JobSummary, bar, on_record: Callable[[dict], None] | None) -> None:
    """Write one finished record and count it (the local and the Ray paths alike)."""
    writer.write(record)
    if on_record is not None:
        on_record(record)
    summary.written += 1
    summary.errors += "error" in record
    bar.update(1)


def progress_bar(total: int, progress: bool, initial: int = 0):
    from tqdm import tqdm

    # disable=None: shown on a terminal only, unless asked for (False) or against (True).
    return tqdm(total=total, initial=initial, unit="row", desc="batch", file=sys.stderr, dynamic_ncols=True,
                smoothing=0.05, disable=None if progress else True)


def run_batch(input_path: str | Path, output: str | Path, *, spec: ModelSpec | None = None,
              settings: BatchSettings | None = None, prompt: str | None = None, progress: bool = True,
              flush_rows: int = 64, flush_seconds: float = 5.0, model: Any = None,
              tokenizer: Any = None, on_record: Callable[[dict], None] | None = None) -> JobSummary:
    """Answer every row of ``input_path`` not yet in ``output`` (a JSONL file, appended to). ``model`` and
    ``tokenizer`` may be given already loaded (else ``spec`` says what to load); ``on_record`` is called
    with each record as it is written."""
    started = time.perf_counter()
    settings = (settings or BatchSettings()).validate()
    job = open_input(input_path, prompt)
    with AppendWriter(output, flush_rows=flush_rows, flush_seconds=flush_seconds) as writer:
        done = writer.done_keys() & set(job.keys)
        remaining = len(job.keys) - len(done)
        summary = JobSummary(len(job.keys), len(done), 0, 0, 0.0)
        if remaining:
            if model is None:
                model, tokenizer = load_model(spec or ModelSpec(), progress=progress)
            runner = BatchRunner(model, tokenizer, settings, base_dir=job.base_dir)
            if runner.rows < settings.batch_size:
                log.warning("the KV cache budget holds %d rows, fewer than --batch-size %d", runner.rows,
                            settings.batch_size)
            bar = progress_bar(len(job.keys), progress, initial=len(done))
            try:
                for record in runner.run(job.rows(done)):
                    take_record(record, writer, summary, bar, on_record)
                    if summary.errors:
                        bar.set_postfix(errors=summary.errors, refresh=False)
            finally:
                bar.close()
                runner.close()
    summary.seconds = time.perf_counter() - started
    return summary
