"""``visualglm demo``: the end-to-end path on a model that needs no download.

No trained model ships with the package yet, so the demo builds a tiny RANDOM model of the ChatGLM-6B
architecture and a tiny SentencePiece tokenizer following ChatGLM-6B's special-token rules, saves both in
the official HF layout, loads them back through the public API and generates. The text it prints is
meaningless: the point is that every stage (checkpoint layout, loader, tokenizer, prompt template,
positions, KV-cache decoding) runs end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    import torch

    import visualglm
    from visualglm.checkpoint.load import build_model
    from visualglm.checkpoint.save import save_checkpoint
    from visualglm.config import get_config
    from visualglm.generation.engine import generate_steps
    from visualglm.tokenizers.chatglm import ChatGLMTokenizer
    from visualglm.tokenizers.tiny import train_chatglm_sentencepiece

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    print("NOTE: no trained model ships yet. This demo uses a tiny RANDOM model of the ChatGLM-6B\n"
          "architecture, so the generated text is meaningless; it shows the whole pipeline working.\n")
    with tempfile.TemporaryDirectory(prefix="visualglm-demo-") as tmp:
        directory = Path(tmp) / "tiny-chatglm"
        torch.manual_seed(0)
        vocab_file = train_chatglm_sentencepiece(Path(tmp) / "vocab")
        vocab = ChatGLMTokenizer(vocab_file)
        # The model's special ids are the tokenizer's, as in the real checkpoint.
        config = dataclasses.replace(
            get_config("chatglm-tiny"), vocab_size=vocab.vocab_size, bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id, mask_token_id=vocab.mask_token_id,
            gmask_token_id=vocab.gmask_token_id, pad_token_id=vocab.pad_token_id, extra={})
        model = build_model(config, device="cpu")
        save_checkpoint(model, directory)
        (directory / "ice_text.model").write_bytes(vocab_file.read_bytes())
        print(f"1. wrote a random {config.num_layers}-layer checkpoint in the official layout: "
              f"{', '.join(sorted(p.name for p in directory.iterdir()))}")

        model = visualglm.load(directory, progress=False)
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
