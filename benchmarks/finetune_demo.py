"""Teach the shipped demo model a new skill with LoRA, on this CPU, in minutes.

The skill: "What is in this image? Answer as color/shape." -> ``red/circle``. The demo model answers
easy-VQA questions (one colour, one shape) but has never been asked for this format. The script:

1. builds at most 200 training examples from easy-VQA *train* images and a held-out set from *test* images
   (answers read from the pixels and checked against each image's own easy-VQA answers);
   plus a few ordinary easy-VQA questions (replay), 200 examples at most;
2. measures held-out accuracy of the new skill and standard easy-VQA accuracy before fine-tuning;
3. LoRA-fine-tunes (``visualglm.finetune``) and measures both again with the adapter.

Targets: held-out accuracy >= 90 % after; easy-VQA accuracy drops by at most 1 point.

    .venv/bin/pip install easy-vqa
    .venv/bin/python benchmarks/finetune_demo.py [--model DIR] [--out runs/finetune-demo]

``--task zh`` teaches cross-lingual answers instead ("... Answer in Chinese." -> ``红色的圆形``), for a
tokenizer that cannot write "/" with a trained piece.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import visualglm
from visualglm.demo import resolve_model
from visualglm.demo.data import Record, image_contents, load_split
from visualglm.demo.evaluate import easyvqa_records, evaluate
from visualglm.demo.translate import COLORS, SHAPES
from visualglm.finetune.data import load_examples
from visualglm.finetune.train import TrainConfig, train
from visualglm.peft import apply_adapter

TASKS = {
    "slash": ("What is in this image? Answer as color/shape.", lambda c, s: f"{c}/{s}"),
    "zh": ("What is in this image? Answer in Chinese.", lambda c, s: f"{COLORS[c]}的{SHAPES[s]}"),
}


def skill_records(split: str, task: str, count: int, seed: int) -> list[Record]:
    """``count`` images of ``split`` (seeded, balanced over the 24 colour/shape pairs as far as possible)."""
    question, answer = TASKS[task]
    questions, paths = load_split(split)
    contents = image_contents(questions, paths)
    by_pair: dict[tuple[str, str], list[int]] = {}
    for image_id, pair in sorted(contents.items()):
        by_pair.setdefault(pair, []).append(image_id)
    rng = random.Random(seed)
    for ids in by_pair.values():
        rng.shuffle(ids)
    chosen: list[int] = []
    while len(chosen) < count and any(by_pair.values()):
        for pair in sorted(by_pair):
            if by_pair[pair] and len(chosen) < count:
                chosen.append(by_pair[pair].pop())
    rng.shuffle(chosen)
    return [Record(paths[i], question, (answer(*contents[i]),), "en", "skill", i) for i in chosen]


def accuracy(model, tokenizer, records: list[Record]) -> tuple[float, list]:
    result = evaluate(model, tokenizer, records, batch_size=64, keep_rows=True)
    return result.accuracy, result.rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model (default: the shipped demo model)")
    parser.add_argument("--out", default="runs/finetune-demo", help="adapter and metrics folder")
    parser.add_argument("--task", choices=sorted(TASKS), default="zh")
    parser.add_argument("--train-examples", type=int, default=100, help="new-skill examples (default: 100)")
    parser.add_argument("--replay", type=int, default=100,
                        help="ordinary easy-VQA train questions mixed in, so old skills stay (default: 100)")
    parser.add_argument("--heldout", type=int, default=240, help="held-out test images (default: 240)")
    parser.add_argument("--easyvqa", type=int, default=600, help="easy-VQA test questions to check (default: 600)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.train_examples + args.replay > 200:
        raise SystemExit("--train-examples + --replay: at most 200 examples")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    tokenizer = visualglm.load_tokenizer(model_dir)
    question, answer = TASKS[args.task]
    sample = answer("red", "circle")
    if tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)).strip() != sample:
        print(f"note: this tokenizer cannot write {sample!r} exactly; try --task zh", file=sys.stderr)

    train_records = skill_records("train", args.task, args.train_examples, args.seed)
    heldout = skill_records("test", args.task, args.heldout, args.seed + 1)
    easy = easyvqa_records("test", "en", limit=args.easyvqa, seed=args.seed)
    data = out / "train.json"
    replay = easyvqa_records("train", "en", limit=args.replay, seed=args.seed) if args.replay else []
    data.write_text(json.dumps([{"img": r.image, "prompt": r.question, "label": r.answers[0]}
                                for r in train_records + replay], ensure_ascii=False, indent=1), encoding="utf-8")

    model = visualglm.load(model_dir, progress=False)
    before_skill, rows = accuracy(model, tokenizer, heldout)
    before_easy, _ = accuracy(model, tokenizer, easy)
    print(f"before: held-out {question!r} accuracy {before_skill:.1%} (e.g. {rows[0][1]!r} for "
          f"{rows[0][0].answers[0]!r}); easy-VQA accuracy {before_easy:.1%}")

    examples, _ = load_examples(data, tokenizer, model.config)
    config = TrainConfig(method="lora", steps=args.steps, batch_size=8, lr=args.lr, warmup=0.05,
                         lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed)
    start = time.time()
    summary = train(model, tokenizer, examples, out, config, base_model=str(model_dir))
    minutes = (time.time() - start) / 60

    tuned = apply_adapter(visualglm.load(model_dir, progress=False), out)
    after_skill, rows = accuracy(tuned, tokenizer, heldout)
    after_easy, _ = accuracy(tuned, tokenizer, easy)
    wrong = [(r.answers[0], a) for r, a, ok in rows if not ok][:5]
    report = {
        "task": question, "train_examples": len(examples), "heldout_images": len(heldout),
        "easyvqa_questions": len(easy), "steps": summary["steps"], "train_minutes": round(minutes, 2),
        "trainable_parameters": summary["trainable_parameters"], "final_loss": round(summary["loss"], 4),
        "heldout_accuracy_before": round(before_skill, 4), "heldout_accuracy_after": round(after_skill, 4),
        "easyvqa_accuracy_before": round(before_easy, 4), "easyvqa_accuracy_after": round(after_easy, 4),
        "easyvqa_drop_points": round(100 * (before_easy - after_easy), 2), "sample_errors": wrong,
        "threads": torch.get_num_threads(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    ok = after_skill >= 0.9 and report["easyvqa_drop_points"] <= 1.0 and minutes <= 10
    print("targets met" if ok else "targets NOT met (held-out >= 90%, easy-VQA drop <= 1 point, <= 10 min)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
