"""``visualglm demo``: ask the shipped demo model about its example images, in English and Chinese.

The demo model is a tiny VisualGLM-6B-architecture model (EVA ViT, Q-Former, ChatGLM decoder) trained by
this package on the easy-VQA data set: one coloured circle, rectangle or triangle per image. It answers
questions about colour, shape and presence and describes the image. Everything runs offline.

``visualglm demo train`` retrains it from scratch (seeded; 27 minutes on a
2-vCPU Xeon with AMX, 40-44 on a 2-vCPU Zen 4 EPYC; ``--set NAME=VALUE`` changes one field of the recipe).
The shipped model is seed 0; the recipe is not steady across seeds (seeds 1 and 2 each leave one
language's yes/no questions half learnt; ``--set name_alignment=0.1`` lifts both, see docs/demo-model.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from visualglm.cli.options import add_hidden_alias

QUESTIONS = ("What color is the shape?", "What shape is in the image?", "Is there a red shape?",
             "Describe this image.", "这个图形是什么颜色？", "图中是什么形状？", "描述这张图片。")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="ask the shipped demo model about example images (offline)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", help="an image to ask about instead of the shipped "
                        "examples (repeatable)")
    parser.add_argument("--question", action="append", help="a question to ask instead of the default ones "
                        "(repeatable)")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped demo model)")
    parser.set_defaults(run=run)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    train = actions.add_parser("train", help="retrain the demo model from scratch on easy-VQA",
                               description="Train the demo model with its fixed recipe (seeded). Needs the "
                               "easy-vqa package. Writes the checkpoint, its tokenizer and training/ (recipe, "
                               "loss log, loss.png). To replace the shipped model: --out visualglm/demo/model.")
    train.add_argument("--out", default="runs/visualglm-demo", help="output directory (default: %(default)s)")
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    train.add_argument("--seed", type=int, default=None,
                       help="random seed (default: the recipe's, 0: the shipped model's; other seeds can end "
                       "weaker, see docs/demo-model.md)")
    train.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="change one TrainRecipe field (repeatable; tuples comma-separated), e.g. "
                       "--set vocab_size=2000 --set turn_weights=0.4,0.15,0.15,0.15,0.15")
    overwrite = train.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_hidden_alias(train, "--force", overwrite)  # the earlier spelling
    train.add_argument("--no-progress", action="store_true", help="log every 100 steps instead of a bar")
    train.set_defaults(run=run_train)


def run(args: argparse.Namespace) -> int:
    import visualglm
    from visualglm.demo import EXAMPLES_DIR, resolve_model
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    model_path = resolve_model(args.model)
    images = [Path(p) for p in args.image] if args.image else sorted(EXAMPLES_DIR.glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no example images in {EXAMPLES_DIR}")
    questions = args.question or list(QUESTIONS)
    start = time.perf_counter()
    model = visualglm.load(model_path, progress=False)
    tokenizer = visualglm.load_tokenizer(model_path)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {model_path} ({params:,} parameters, loaded in {time.perf_counter() - start:.2f} s); "
          "greedy decoding\n")
    for image in images:
        session = ChatSession(model, tokenizer, sampling=SamplingParams(do_sample=False), image=image)
        print(f"image: {image}")
        for question in questions:
            session.clear_history()  # each question on its own, as the model was trained
            print(f"  Q: {question}\n  A: {session.chat(question)}")
        print()
    return 0


def run_train(args: argparse.Namespace) -> int:
    from visualglm.demo.recipe import TrainRecipe
    from visualglm.demo.train import train

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    recipe = TrainRecipe()
    changes = recipe_changes(recipe, args.set)
    changes |= {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    recipe = dataclasses.replace(recipe, **changes)
    train(out, recipe, progress=not args.no_progress)
    return 0


def recipe_changes(recipe, assignments: list[str]) -> dict:
    """``NAME=VALUE`` strings as typed changes of ``recipe``'s fields (the type of each field's value:
    int, float, bool, or a tuple of floats written comma-separated, as long as the default's unless the
    field takes any length)."""
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in fields:
            raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        current = getattr(recipe, name)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1")
            elif isinstance(current, tuple):
                value = tuple(float(part) for part in text.split(","))
                if "..." not in str(fields[name].type) and len(value) != len(current):
                    raise ValueError(f"expected {len(current)} comma-separated numbers")
            else:
                value = type(current)(text)
        except ValueError as error:
            kind = type(current).__name__
            raise ValueError(f"--set {assignment!r}: {name} takes a {kind} value ({error})") from None
        changes[name] = value
    return changes
