"""Flags shared by the commands that load a model and generate, with the reference's defaults."""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory, known name (chatglm-6b) or hub id (default: the "
                        "shipped demo model, a tiny VisualGLM trained on easy-VQA)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: the checkpoint's; float16 becomes "
                        "bfloat16 on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    add_quant_flags(parser)
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA or P-tuning adapter folder (peft layout, e.g. from `visualglm finetune`)")


def add_quant_flags(parser: argparse.ArgumentParser) -> None:
    """``--quantize 8|4`` and the optional parts it may also cover (read back with ``quantize_also``).

    The Python API's names (``quantize=``, ``quantize_also=("vision", "output")``); the earlier spellings
    ``--quant``, ``--quant-vision`` and ``--quant-output`` still parse, hidden from the help."""
    bits = parser.add_argument("--quantize", type=int, choices=(8, 4), default=None, dest="quant",
                               help="weight-only INT8 or INT4 (group 128) for the language model's linears")
    vision = parser.add_argument("--quantize-vision", action="store_true", dest="quant_vision",
                                 help="with --quantize: quantize the image encoder too (smaller, less exact; the "
                                 "references keep it in floating point)")
    output = parser.add_argument("--quantize-output", action="store_true", dest="quant_output",
                                 help="with --quantize: quantize the output layer too (GLM-4V-9B; where it is tied "
                                 "to the embeddings, ChatGLM-6B and VisualGLM-6B, an INT8 copy for the logits, "
                                 "+0.53 GB)")
    for old, action in (("--quant", bits), ("--quant-vision", vision), ("--quant-output", output)):
        add_hidden_alias(parser, old, action)


def add_hidden_alias(parser: argparse.ArgumentParser, old: str, action: argparse.Action) -> None:
    """Keep ``old``, an earlier spelling of ``action``'s flag, working for existing scripts: same dest, type,
    choices and default, hidden from the help and from docs/cli.md."""
    if isinstance(action, argparse._StoreTrueAction):
        parser.add_argument(old, action="store_true", dest=action.dest, help=argparse.SUPPRESS)
        return
    parser.add_argument(old, type=action.type, choices=action.choices, default=action.default, dest=action.dest,
                        metavar=action.metavar, help=argparse.SUPPRESS)


def quantize_also(args: argparse.Namespace) -> tuple[str, ...]:
    """The optional parts named by ``--quantize-vision`` / ``--quantize-output`` (they need ``--quantize``)."""
    parts = tuple(part for part, flag in (("vision", "quant_vision"), ("output", "quant_output"))
                  if getattr(args, flag, False))
    if parts and getattr(args, "quant", None) is None:
        raise ValueError("--quantize-vision / --quantize-output need --quantize 8 or --quantize 4")
    return parts




def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="tensor parallelism: run on N processes, each holding 1/N of the language model "
                        "(relaunches itself under torch.distributed.run; with --device cuda one GPU each)")


def relaunch_for_tp(args: argparse.Namespace) -> int | None:
    """With ``--tp N`` (N > 1) outside torchrun: run this command line on N processes and return their exit
    status. None when the command should run here (no --tp, or already one of torchrun's ranks)."""
    tp = getattr(args, "tp", None)
    if tp is None or tp == 1:
        return None
    if tp < 1:
        raise ValueError(f"--tp must be at least 1, got {tp}")
    from visualglm.distributed.launch import launched_by_torchrun, relaunch

    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise ValueError(f"--tp {tp} does not match the {world} processes torchrun started")
        return None
    if args.command not in sys.argv[1:]:
        raise ValueError("--tp relaunches the command line it was given; run `visualglm ...` or use torchrun")
    return relaunch(tp, sys.argv[1:])


def set_session_image(session, source) -> None:
    """Attach an image (path or URL) to the session. Under tensor parallelism rank 0 reads it and every
    rank gets the same picture, so the ranks cannot disagree about a file or a download."""
    from visualglm.distributed.launch import rank0_call
    from visualglm.image import load_image

    session.set_image(rank0_call(load_image, source, allow_remote=True))


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="image file or http(s) URL to talk about (VisualGLM-6B models)")
    parser.add_argument("--english", action="store_true",
                        help="VisualGLM-6B English mode: Q:/A: template, Chinese pieces banned (as its demo)")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """Defaults (None) mean "the model's reference defaults": ChatGLM-6B chat() samples with top_p 0.7,
    temperature 0.95 and HF's implicit top_k 50; VisualGLM-6B's demo with top_p 0.4, top_k 100,
    temperature 0.8, repetition penalty 1.2; GLM-4V-9B's chat() with top_p 0.8, temperature 0.8, top_k 50.
    max_length (prompt + answer) 2048, GLM-4V 8192."""
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt + answer tokens, as the reference counts (default: 2048; GLM-4V 8192)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer tokens at most (default: no "
                        "limit besides --max-length)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 0.7; "
                        "VisualGLM 0.4; GLM-4V 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens, 0 = off "
                        "(default: 50, what the reference applies implicitly; VisualGLM 100)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: 0.95; VisualGLM 0.8; GLM-4V 0.8)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="penalty for tokens already present, 1.0 = off (default: 1.0; VisualGLM 1.2)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--compile", action="store_true",
                        help="decode with torch.compile (slow start; see README for whether it pays off)")


def load_from_flags(args: argparse.Namespace, parallel=None):
    """The model, tokenizer and name that ``--model/--dtype/--device/--quantize*/--adapter`` name (see
    :func:`visualglm.demo.loading.load_model`). ``parallel``: this rank's tensor-parallel context
    (``init_from_env``), whose device wins over ``--device``; None to load the whole model."""
    from visualglm.demo.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=parallel.device if parallel else args.device,
                      quantize=args.quant, quantize_also=quantize_also(args),
                      adapter=getattr(args, "adapter", None), tensor_parallel=parallel is not None)


def build_session(args: argparse.Namespace):
    """Load the model and tokenizer named by the flags and return a ChatSession."""
    from visualglm.demo import resolve_model
    from visualglm.distributed.launch import init_from_env, shared_seed
    from visualglm.generation.chat import FAMILY_DEFAULT, ChatSession
    from visualglm.generation.sampling import SamplingParams

    args.model = resolve_model(args.model)
    # Under torchrun: join the process group; this rank loads its shard only and, unless it is rank 0, is silent.
    parallel = init_from_env(args.device)
    if parallel is not None and args.compile:
        raise ValueError("--compile is not supported with tensor parallelism")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError("--max-length must be at least 2")
    overrides = {name: value for name, value in (
        ("top_p", args.top_p), ("top_k", args.top_k), ("temperature", args.temperature),
        ("repetition_penalty", args.repetition_penalty), ("seed", args.seed)) if value is not None}
    if args.greedy:
        overrides["do_sample"] = False
    if parallel is not None:  # every rank must sample the same tokens: one seed, chosen by rank 0
        overrides["seed"] = shared_seed(overrides.get("seed"))
    SamplingParams(**overrides).validate()  # bad flags fail before the (slow) model load
    model, tokenizer, _ = load_from_flags(args, parallel)
    english = True if getattr(args, "english", False) else None
    max_length = FAMILY_DEFAULT if args.max_length is None else args.max_length
    session = ChatSession(model, tokenizer, max_length=max_length, max_new_tokens=args.max_new_tokens,
                          compile=args.compile, english=english)
    session.sampling = session.sampling.replace(**overrides).validate()
    session.reseed()
    if getattr(args, "image", None):
        set_session_image(session, args.image)
    return session


def terminal_safe(text: str) -> str:
    """Model text with control characters (other than newline and tab) shown as escapes, so that output
    can never drive the terminal (clear the screen, move the cursor, set the title, ...)."""
    if text.isprintable():
        return text
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ascii(ch)[1:-1] for ch in text)
