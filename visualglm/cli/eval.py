"""``visualglm eval``: visual question answering accuracy of a VisualGLM-6B-architecture model.

Tasks (the demo model's evaluations; all but ``vqa`` use easy-VQA's test images, and nothing in them was
used in training):

- ``easyvqa``: the easy-VQA test (or train) split's questions, English or their Chinese translations;
- ``phrasings``: questions in held-out phrasings (sentence frames never used in training), one per
  question type (colour, shape, yes/no, describe) per test image;
- ``multiturn``: 5-turn conversations (easy-VQA questions, held-out phrasings and out-of-scope inputs in
  English, Chinese or mixed), answered turn by turn after the model's own earlier answers; accuracy by turn;
- ``oos``: held-out out-of-scope inputs (greetings, other questions, requests); the rate of answers that are
  the model's "what I can do" reply in the input's language;
- ``vqa``: any jsonl file of {"image", "question", "answer"} lines.

Answers are generated greedily as free text through the chat templates and scored by normalised exact
match. A table goes to stdout; with ``--json`` the last stdout line is one JSON object with ``accuracy``
(a fraction) and ``n`` (and ``by_turn`` for ``multiturn``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from visualglm.cli.options import add_quant_flags, quantize_also


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="VQA accuracy on easy-VQA or a jsonl file", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    easy = tasks.add_parser("easyvqa", help="the easy-VQA data set (pip package easy-vqa)")
    easy.add_argument("--split", choices=("test", "train"), default="test", help="default: %(default)s")
    phrasings = tasks.add_parser("phrasings", help="easy-VQA test images, questions in held-out phrasings")
    multiturn = tasks.add_parser("multiturn", help="5-turn conversations about easy-VQA test images, by turn")
    oos = tasks.add_parser("oos", help="held-out out-of-scope inputs: rate of 'what I can do' replies")
    for sub in (easy, phrasings, oos):
        sub.add_argument("--lang", choices=("en", "zh"), default="en", help="English or Chinese (default: "
                         "%(default)s)")
    multiturn.add_argument("--lang", choices=("en", "zh", "mixed"), default="mixed",
                           help="every turn English, every turn Chinese, or each turn either (default: %(default)s)")
    multiturn.add_argument("--turns", type=int, default=5, help="turns per conversation (default: %(default)s)")
    for sub in (easy, phrasings, oos, multiturn):
        sub.add_argument("--limit", type=int, default=None, help="score a fixed seeded sample of this many "
                         + ("conversations" if sub is multiturn else "questions") + " (default: all)")
    vqa = tasks.add_parser("vqa", help="a jsonl file: one {image, question, answer} object per line")
    vqa.add_argument("--data", required=True, help="the jsonl file (image paths relative to it)")
    for sub in (easy, phrasings, multiturn, oos, vqa):
        sub.add_argument("--model", help="checkpoint directory or name (default: the shipped demo model)")
        sub.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
        sub.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
        add_quant_flags(sub)
        sub.add_argument("--adapter", default=None, metavar="DIR",
                         help="LoRA or P-tuning adapter folder (peft layout, e.g. from `visualglm finetune`)")
        sub.add_argument("--batch-size", type=int, default=64,
                         help="questions generating at once (rows of the engine; default: 64)")
        sub.add_argument("--show-errors", type=int, default=0, metavar="N",
                         help="print up to N wrong answers (default: 0)")
        sub.add_argument("--json", action="store_true", help="end with one JSON line of the results")
        sub.set_defaults(run=run)


def _items(args: argparse.Namespace) -> tuple[list, str]:
    """The records (or conversations for ``multiturn``) of the task, and its label."""
    from visualglm.demo import dialogue
    from visualglm.demo.evaluate import easyvqa_records, read_vqa_jsonl

    if args.task == "easyvqa":
        return easyvqa_records(args.split, args.lang, args.limit), f"easy-VQA {args.split} ({args.lang})"
    if args.task == "vqa":
        return read_vqa_jsonl(args.data), args.data
    if args.task == "phrasings":
        items = dialogue.heldout_phrasing_records(args.lang)
        label = f"held-out phrasings, easy-VQA test images ({args.lang})"
    elif args.task == "oos":
        items = dialogue.heldout_oos_records(args.lang)
        label = f"held-out out-of-scope inputs ({args.lang})"
    else:
        items = dialogue.eval_conversations(args.lang, turns=args.turns)
        label = f"{args.turns}-turn conversations, easy-VQA test images ({args.lang})"
    return dialogue.limit_items(items, args.limit), label


def run(args: argparse.Namespace) -> int:
    import visualglm
    from visualglm.demo import DEMO_FAMILY, resolve_model
    from visualglm.demo.evaluate import evaluate, evaluate_conversations
    from visualglm.families import family_spec

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.task == "multiturn" and not 1 <= args.turns <= 16:
        raise ValueError("--turns must be 1..16")
    items, label = _items(args)
    model_path = resolve_model(args.model)
    model = visualglm.load(model_path, dtype=args.dtype, device=args.device, quantize=args.quant,
                           quantize_also=quantize_also(args), progress=False)
    demo = family_spec(DEMO_FAMILY)
    if family_spec(model) is not demo:  # the tasks are the demo model's evaluations
        raise ValueError(f"{model_path} is not a {demo.display_name}-architecture model: eval needs one")
    if args.adapter:
        from visualglm.peft import apply_adapter

        apply_adapter(model, args.adapter)
    tokenizer = visualglm.load_tokenizer(model_path)
    started = time.perf_counter()
    conversations = args.task == "multiturn"
    bar = _progress(sum(len(c.turns) for c in items) if conversations else len(items))
    on_batch = bar.update if bar is not None else None
    keep = args.show_errors > 0
    if conversations:
        result = evaluate_conversations(model, tokenizer, items, batch_size=args.batch_size, keep_rows=keep,
                                        on_batch=on_batch)
        parts = [(f"turn {k}", turn) for k, turn in enumerate(result.turns, start=1)]
    else:
        result = evaluate(model, tokenizer, items, batch_size=args.batch_size, keep_rows=keep, on_batch=on_batch)
        parts = [("", result)]
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    also = quantize_also(args)
    print(f"{label}: {result.n} questions, model {model_path}" + (f", int{args.quant}" if args.quant else "")
          + (f" (also {', '.join(also)})" if also else "") + (f", adapter {args.adapter}" if args.adapter else ""))
    _table(parts, result.accuracy, sum(p.n for _, p in parts), sum(sum(p.correct.values()) for _, p in parts))
    refused = sum(sum(p.refused.values()) for _, p in parts)
    if refused:
        print(f"in-scope questions answered with the out-of-scope reply: {refused}")
    print(f"{seconds:.1f} s ({result.n / max(seconds, 1e-9):.1f} questions/s)")
    wrong = [row for _, p in parts for row in p.rows if not row[2]][:args.show_errors]
    for record, answer, _ in wrong:
        print(f"  wrong: {record.image} | {record.question} -> {answer!r} (expected {record.answers[0]!r})")
    if args.json:
        summary = {**result.summary(), "model": str(model_path), "data": label, "quant": args.quant,
                   "quant_also": list(also), "adapter": args.adapter, "seconds": round(seconds, 2)}
        print(json.dumps(summary, ensure_ascii=False))
    return 0


def _table(parts: list, accuracy: float, n: int, correct: int) -> None:
    """One row per question type (and per turn for conversations), then the overall figure."""
    print(f"{'':<8}{'type':<10} {'correct':>8} {'n':>6} {'accuracy':>9}")
    for name, part in parts:
        for qtype, row in part.by_type().items():
            print(f"{name:<8}{qtype:<10} {row['correct']:>8} {row['n']:>6} {row['accuracy'] * 100:>8.2f}%")
        if name:
            print(f"{name:<8}{'all':<10} {sum(part.correct.values()):>8} {part.n:>6} {part.accuracy * 100:>8.2f}%")
    print(f"{'':<8}{'overall':<10} {correct:>8} {n:>6} {accuracy * 100:>8.2f}%")


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="q", file=sys.stderr, dynamic_ncols=True)
