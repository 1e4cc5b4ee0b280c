"""Does the demo model generalise beyond easy-VQA's own pictures?

Draws new images in the data set's style (random colour, shape, size, position, aspect and background; canvases
of 64, 96 and 160 px, resized by the normal preprocessing) and asks every easy-VQA question template about
each, in English and Chinese, answered by the normal batched chat path and scored like ``visualglm eval``.
Prints accuracy per language and question type.

Usage: python -m benchmarks.demo_generalisation [--model DIR] [--images 200] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path


def templates(color: str, shape: str, rng: random.Random) -> list[str]:
    """One question per easy-VQA template, about a random colour/shape (present or not)."""
    from visualglm.demo.data import PALETTE
    from visualglm.demo.translate import SHAPES

    some_color = rng.choice([color, rng.choice(sorted(PALETTE))])
    some_shape = rng.choice([shape, rng.choice(sorted(SHAPES))])
    out = ["what color is the shape?", "what is the color of the shape?", f"what color is the {shape}?",
           f"what is the color of the {shape}?", "what shape is in the image?", "what shape does the image contain?",
           "what shape is present?", f"what is the {color} shape?"]
    for x in (f"{some_color} shape", some_shape):
        out += [f"is there a {x}?", f"is there a {x} in the image?", f"is a {x} present?",
                f"does the image contain a {x}?", f"is there not a {x}?", f"is there not a {x} in the image?",
                f"is no {x} present?", f"does the image not contain a {x}?"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped demo model)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import visualglm
    from visualglm.demo import resolve_model
    from visualglm.demo.data import Record, answer_for, question_type_of
    from visualglm.demo.draw import random_drawing
    from visualglm.demo.evaluate import evaluate
    from visualglm.demo.translate import translate_answer, translate_question

    model_path = resolve_model(args.model)
    model = visualglm.load(model_path, progress=False)
    tokenizer = visualglm.load_tokenizer(model_path)
    rng = random.Random(args.seed)
    records = []
    with tempfile.TemporaryDirectory(prefix="visualglm-drawn-") as tmp:
        for i in range(args.images):
            image, color, shape = random_drawing(rng, canvas=rng.choice([64, 96, 160]))
            path = Path(tmp) / f"{i}.png"
            image.save(path)
            for question in templates(color, shape, rng):
                answer = answer_for(question, color, shape)
                qtype = question_type_of(question)
                asked = question[:1].upper() + question[1:] if rng.random() < 0.5 else question
                records.append(Record(str(path), asked, (answer,), "en", qtype, i))
                records.append(Record(str(path), translate_question(question), (translate_answer(answer),), "zh",
                                      qtype, i))
        results = {lang: evaluate(model, tokenizer, [r for r in records if r.lang == lang]) for lang in ("en", "zh")}
    summary = {}
    for lang, result in results.items():
        by_type = {t: round(v["accuracy"], 4) for t, v in result.by_type().items()}
        print(f"{lang}: {result.accuracy * 100:.2f}% of {result.n} questions on {args.images} new drawings; "
              + ", ".join(f"{t} {a * 100:.2f}%" for t, a in by_type.items()))
        summary[lang] = {"accuracy": result.accuracy, "n": result.n, "by_type": by_type}
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
