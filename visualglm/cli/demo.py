"""``visualglm demo``: the end-to-end path on models that need no download.

No trained model ships with the package yet, so the demo builds tiny RANDOM models of the ChatGLM-6B and
VisualGLM-6B architectures with a tiny SentencePiece tokenizer following ChatGLM-6B's special-token rules,
saves them in the official HF layout, loads them back through the public API, chats about text and about
a generated image. The text they print is meaningless: the point is that every stage (checkpoint layout,
loader, tokenizer, prompt templates, image preprocessing, vision tower, positions, KV-cache decoding,
streaming detokenisation) runs end to end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the end-to-end demo (offline)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="你好", help="prompt text (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    import visualglm
    from visualglm.checkpoint.tiny import write_tiny_random_checkpoint
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    print("NOTE: no trained model ships yet. This demo uses tiny RANDOM models of the ChatGLM-6B and\n"
          "VisualGLM-6B architectures, so the generated text is meaningless; it shows the pipeline working.\n")
    greedy = SamplingParams(do_sample=False)
    with tempfile.TemporaryDirectory(prefix="visualglm-demo-") as tmp:
        text_dir = write_tiny_random_checkpoint(Path(tmp) / "tiny-chatglm")
        print("1. wrote a tiny random ChatGLM-6B checkpoint in the official layout: "
              f"{', '.join(sorted(p.name for p in text_dir.iterdir()))}")
        model = visualglm.load(text_dir, progress=False)
        tokenizer = visualglm.load_tokenizer(text_dir)
        print(f"2. loaded it with visualglm.load ({sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{next(model.parameters()).dtype}) and its tokenizer ({tokenizer.vocab_size} pieces)")
        session = ChatSession(model, tokenizer, sampling=greedy, max_new_tokens=args.max_new_tokens)
        ids, _ = session.prompt_ids(args.prompt)
        print(f"3. prompt {args.prompt!r} -> {len(ids)} ids (ending in [gMASK] <sop>)")
        start = time.perf_counter()
        answer = session.chat(args.prompt)
        print(f"   streamed answer in {(time.perf_counter() - start) * 1000:.0f} ms: {answer!r}")

        visual_dir = write_tiny_random_checkpoint(Path(tmp) / "tiny-visualglm", family="visualglm")
        image_file = Path(tmp) / "red-square.png"
        Image.new("RGB", (64, 64), (220, 30, 30)).save(image_file)
        visual = visualglm.load(visual_dir, progress=False)
        print(f"4. tiny random VisualGLM-6B ({sum(p.numel() for p in visual.parameters()):,} parameters: EVA ViT, "
              "Q-Former, projection, ChatGLM)")
        session = ChatSession(visual, visualglm.load_tokenizer(visual_dir), sampling=greedy,
                              max_new_tokens=args.max_new_tokens, image=image_file)
        for question in ("描述这张图片。", "What colour is it?"):
            print(f"   Q: {question}\n   A: {session.chat(question)!r}")
        print(f"   (the image went through the vision tower {session.encoded_images} time for both turns)")
    return 0
