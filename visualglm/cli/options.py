"""Flags shared by the commands that load a model and generate, with the reference's defaults."""

from __future__ import annotations

import argparse
import unicodedata


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory, known name (chatglm-6b) or hub id")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: the checkpoint's; float16 becomes "
                        "bfloat16 on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """Defaults are those of the reference ChatGLM-6B chat(): sampling, top_p 0.7, temperature 0.95,
    HF's implicit top_k 50, max_length 2048 (prompt + answer)."""
    parser.add_argument("--max-length", type=int, default=2048,
                        help="prompt + answer tokens, as the reference counts (default: 2048)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer tokens at most (default: no "
                        "limit besides --max-length)")
    parser.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling mass (default: 0.7)")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens, 0 = off (default: "
                        "50, what the reference applies implicitly)")
    parser.add_argument("--temperature", type=float, default=0.95, help="sampling temperature (default: 0.95)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="penalty for tokens already present, 1.0 = off (default: 1.0)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--compile", action="store_true",
                        help="decode with torch.compile (slow start; see README for whether it pays off)")


def build_session(args: argparse.Namespace):
    """Load the model and tokenizer named by the flags and return a ChatSession."""
    import visualglm
    from visualglm.generation.chat import ChatSession
    from visualglm.generation.sampling import SamplingParams

    if not args.model:
        raise ValueError("no default model ships yet: pass --model DIR (a ChatGLM-6B checkpoint directory)")
    sampling = SamplingParams.chatglm6b(top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
                                        repetition_penalty=args.repetition_penalty, do_sample=not args.greedy,
                                        seed=args.seed).validate()
    if args.max_length is not None and args.max_length < 2:
        raise ValueError("--max-length must be at least 2")
    tokenizer = visualglm.load_tokenizer(args.model)
    model = visualglm.load(args.model, dtype=args.dtype, device=args.device)
    return ChatSession(model, tokenizer, sampling=sampling, max_length=args.max_length,
                       max_new_tokens=args.max_new_tokens, compile=args.compile)


def terminal_safe(text: str) -> str:
    """Model text with control characters (other than newline and tab) shown as escapes, so that output
    can never drive the terminal (clear the screen, move the cursor, set the title, ...)."""
    if text.isprintable():
        return text
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ascii(ch)[1:-1] for ch in text)
