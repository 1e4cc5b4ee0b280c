"""``visualglm eval``: visual question answering accuracy of a VisualGLM-6B-architecture model.

``easyvqa`` scores the easy-VQA test (or train) split in English or Chinese; ``vqa`` scores any jsonl file
of {"image", "question", "answer"} lines. Answers are generated greedily as free text through the chat
templates and scored by normalised exact match. A table goes to stdout; with ``--json`` the last stdout
line is one JSON object with ``accuracy`` (a fraction) and ``n``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from visualglm.cli.options import add_quant_flags, quant_also


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="VQA accuracy on easy-VQA or a jsonl file", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    easy = tasks.add_parser("easyvqa", help="the easy-VQA data set (pip package easy-vqa)")
    easy.add_argument("--split", choices=("test", "train"), default="test", help="default: %(default)s")
    easy.add_argument("--lang", choices=("en", "zh"), default="en",
                      help="English questions or their Chinese translations (default: %(default)s)")
    easy.add_argument("--limit", type=int, default=None,
                      help="score a fixed seeded sample of this many questions (default: all)")
    vqa = tasks.add_parser("vqa", help="a jsonl file: one {image, question, answer} object per line")
    vqa.add_argument("--data", required=True, help="the jsonl file (image paths relative to it)")
    for sub in (easy, vqa):
        sub.add_argument("--model", help="checkpoint directory or name (default: the shipped demo model)")
        sub.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
        sub.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
        add_quant_flags(sub)
        sub.add_argument("--adapter", default=None, metavar="DIR",
                         help="LoRA or P-tuning adapter folder (peft layout, e.g. from `visualglm finetune`)")
        sub.add_argument("--batch-size", type=int, default=64, help="questions per batch (default: 64)")
        sub.add_argument("--show-errors", type=int, default=0, metavar="N",
                         help="print up to N wrong answers (default: 0)")
        sub.add_argument("--json", action="store_true", help="end with one JSON line of the results")
        sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import visualglm
    from visualglm.demo import resolve_model
    from visualglm.demo.evaluate import easyvqa_records, evaluate, read_vqa_jsonl

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.task == "easyvqa":
        records = easyvqa_records(args.split, args.lang, args.limit)
        label = f"easy-VQA {args.split} ({args.lang})"
    else:
        records = read_vqa_jsonl(args.data)
        label = args.data
    model_path = resolve_model(args.model)
    model = visualglm.load(model_path, dtype=args.dtype, device=args.device, quantize=args.quant,
                           quantize_also=quant_also(args), progress=False)
    if not hasattr(model, "encode_images") or model.config.family != "visualglm":
        raise ValueError(f"{model_path} is not a VisualGLM-6B-architecture model: eval needs one")
    if args.adapter:
        from visualglm.peft import apply_adapter

        apply_adapter(model, args.adapter)
    tokenizer = visualglm.load_tokenizer(model_path)
    started = time.perf_counter()
    bar = _progress(len(records))
    result = evaluate(model, tokenizer, records, batch_size=args.batch_size, keep_rows=args.show_errors > 0,
                      on_batch=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    also = quant_also(args)
    print(f"{label}: {result.n} questions, model {model_path}" + (f", int{args.quant}" if args.quant else "")
          + (f" (also {', '.join(also)})" if also else "") + (f", adapter {args.adapter}" if args.adapter else ""))
    print(f"{'type':<10} {'correct':>8} {'n':>6} {'accuracy':>9}")
    for qtype, row in result.by_type().items():
        print(f"{qtype:<10} {row['correct']:>8} {row['n']:>6} {row['accuracy'] * 100:>8.2f}%")
    print(f"{'overall':<10} {sum(result.correct.values()):>8} {result.n:>6} {result.accuracy * 100:>8.2f}%")
    print(f"{seconds:.1f} s ({result.n / max(seconds, 1e-9):.1f} questions/s)")
    wrong = [row for row in result.rows if not row[2]][:args.show_errors]
    for record, answer, _ in wrong:
        print(f"  wrong: {record.image} | {record.question} -> {answer!r} (expected {record.answers[0]!r})")
    if args.json:
        summary = {**result.summary(), "model": str(model_path), "data": label, "quant": args.quant,
                   "quant_also": list(also), "adapter": args.adapter,
                   "seconds": round(seconds, 2)}
        print(json.dumps(summary, ensure_ascii=False))
    return 0


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="q", file=sys.stderr, dynamic_ncols=True)
