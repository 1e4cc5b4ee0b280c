"""``visualglm demo``: the end-to-end path on a model that needs no download.

No trained model ships with the package yet, so the demo builds a tiny RANDOM model of the ChatGLM-6B
architecture and a tiny SentencePiece tokenizer following ChatGLM-6B's special-token rules, saves both in
the official HF layout, loads them back through the public API and generates. The text it prints is
meaningless: the point is that every stage (checkpoint layout, loader, tokenizer, prompt template,
positions, KV-cache decoding) runs end to end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the end-to-end demo (offline)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="你好, VisualGLM!", help="prompt text (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import visualglm
    from visualglm.checkpoint.tiny import write_tiny_random_checkpoint
    from visualglm.generation.engine import generate_steps

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    print("NOTE: no trained model ships yet. This demo uses a tiny RANDOM model of the ChatGLM-6B\n"
          "architecture, so the generated text is meaningless; it shows the whole pipeline working.\n")
    with tempfile.TemporaryDirectory(prefix="visualglm-demo-") as tmp:
        directory = write_tiny_random_checkpoint(Path(tmp) / "tiny-chatglm")
        print("1. wrote a tiny random checkpoint in the official layout: "
              f"{', '.join(sorted(p.name for p in directory.iterdir()))}")

        model = visualglm.load(directory, progress=False)
        config = model.config
        tokenizer = visualglm.load_tokenizer(directory)
        print(f"2. loaded it with visualglm.load ({sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{next(model.parameters()).dtype}) and its tokenizer ({tokenizer.vocab_size} pieces)")

        ids = tokenizer.encode(args.prompt)
        print(f"3. prompt {args.prompt!r} -> {len(ids)} ids (ending in [gMASK] <sop>): {ids}")
        start = time.perf_counter()
        new_ids = []
        for step in generate_steps(model, [ids], max_new_tokens=args.max_new_tokens):
            token = int(step.tokens[0])
            if token == config.eos_token_id:
                break
            new_ids.append(token)
        seconds = time.perf_counter() - start
        print(f"4. greedy decoding with the KV cache: {len(new_ids)} tokens in {seconds * 1000:.0f} ms")
        print(f"   ids:  {new_ids}")
        print(f"   text: {tokenizer.decode(new_ids)!r}  (random weights: meaningless)")
    return 0
