"""``visualglm batch``: answer every row of a JSONL file (or every image of a folder) into a JSONL output.

Rows are ``{"id", "image"?, "prompt" | "messages", sampling fields?}``; results ``{"id", "answer",
"finish_reason", "prompt_tokens", "completion_tokens"}``, or ``{"id", "error"}`` for a row that could not
run. Run the same command again after a crash or Ctrl-C: ids already written are skipped. With ``--ray``
the job runs on a Ray cluster (extra ``ray``) and the output is a folder of shards.
"""

from __future__ import annotations

import argparse
import signal
import sys

from visualglm.cli.options import add_generation_flags, add_model_flags, quantize_also


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("batch", help="answer a JSONL data set or a folder of images (resumable; "
                                 "one machine or Ray)", description=__doc__)
    parser.add_argument("input", help="JSONL file of rows, or a folder of images (with --prompt)")
    parser.add_argument("-o", "--output", required=True,
                        help="results: a JSONL file, appended to and resumed (with --ray: a folder of shards)")
    parser.add_argument("--prompt", default=None,
                        help="the question for every image of a folder, or for rows without prompt/messages")
    add_model_flags(parser)
    add_generation_flags(parser)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows generating at once on each model (default: 8)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="cap the KV cache: fewer rows at once when --batch-size rows of full context do "
                        "not fit (default: no cap)")
    parser.add_argument("--image-workers", type=int, default=2,
                        help="threads reading and preprocessing images ahead of the model (default: 2)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (public addresses only; default: files and data: URLs)")
    parser.add_argument("--flush-rows", type=int, default=None,
                        help="rows per durable write: a chunk fsynced (default: 64), with --ray a shard "
                        "(default: 1000)")
    parser.add_argument("--flush-seconds", type=float, default=None,
                        help="at most this long between durable writes (default: 5; with --ray 30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (rows/s, ETA) on stderr")
    ray = parser.add_argument_group("Ray (pip install 'visualglm[ray]')")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on Ray: the cluster at ADDRESS (ray://host:10001, auto), or alone the one "
                     "ray.init() finds (RAY_ADDRESS, a running local cluster, else a new local one)")
    ray.add_argument("--replicas", type=int, default=None,
                     help="model replicas (default: one per GPU with --device cuda, else cluster CPUs / "
                     "--cpus-per-replica)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs of one replica (default: 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs of one replica (default: 1 with --device cuda, else 0)")
    ray.add_argument("--rows-per-task", type=int, default=None,
                     help="rows a replica gets per task (default: 4 x --batch-size)")
    parser.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace):
    from visualglm.batch import BatchSettings
    from visualglm.generation.chat import FAMILY_DEFAULT

    sampling = {name: value for name, value in (
        ("top_p", args.top_p), ("top_k", args.top_k), ("temperature", args.temperature),
        ("repetition_penalty", args.repetition_penalty)) if value is not None}
    if args.greedy:
        sampling["do_sample"] = False
    # No --max-length: the family's reference max_length (FAMILY_DEFAULT).
    max_length = FAMILY_DEFAULT if args.max_length is None else args.max_length
    return BatchSettings(batch_size=args.batch_size, sampling=sampling, seed=args.seed, max_length=max_length,
                         max_new_tokens=args.max_new_tokens, image_workers=args.image_workers,
                         allow_remote_images=args.allow_remote_images, kv_cache_gib=args.kv_cache_gib).validate()


def run(args: argparse.Namespace) -> int:
    from visualglm.batch import ModelSpec

    settings = settings_from_args(args)  # bad flags fail before the input is read
    spec = ModelSpec(args.model, args.dtype, args.device, args.quant, quantize_also(args), args.adapter, args.compile)
    if args.flush_rows is not None and args.flush_rows < 1:
        raise ValueError("--flush-rows must be at least 1")
    flush = {name: value for name, value in (("flush_rows", args.flush_rows), ("flush_seconds", args.flush_seconds))
             if value is not None}
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill flushes the rows done, as Ctrl-C does
    try:
        summary = _run(args, spec, settings, flush)
    except KeyboardInterrupt:
        print(f"interrupted: the rows finished so far are saved in {args.output}; run the same command to "
              "resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.line(args.output), file=sys.stderr)
    return 0


def _run(args: argparse.Namespace, spec, settings, flush: dict):
    from visualglm.batch import RayOptions, run_batch, run_batch_on_ray

    if args.ray is None:
        return run_batch(args.input, args.output, spec=spec, settings=settings, prompt=args.prompt,
                         progress=not args.no_progress, **flush)
    options = RayOptions(address=args.ray or None, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                         gpus_per_replica=args.gpus_per_replica, rows_per_task=args.rows_per_task)
    return run_batch_on_ray(args.input, args.output, spec=spec, settings=settings, prompt=args.prompt,
                            options=options, progress=not args.no_progress, **flush)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
