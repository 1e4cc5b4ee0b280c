"""``visualglm quantize SRC DST --bits 4|8``: write a weight-only quantized copy of a checkpoint."""

from __future__ import annotations

import argparse
import sys

from visualglm.cli.options import add_hidden_alias
from visualglm.config import FAMILY_NAMES


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quantize", help="write a weight-only INT8/INT4 copy of a checkpoint",
        description="Read a checkpoint (HF or sat layout), quantize the language model's linears as each weight "
        "is read (the full-precision model is never in memory) and write config.json + safetensors + the "
        "tokenizer files to DST. Embeddings, the output layer and the vision tower stay in floating point. "
        "Load the result like any checkpoint (visualglm chat/ask --model DST); it is not quantized again. DST "
        "appears complete or not at all.")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory (or a known name / hub id)")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True,
                        help="8: INT8, one scale per output row; 4: INT4, one scale and zero per group")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=None,
                        help="INT4 only: input columns sharing a scale (default: 128; smaller is more "
                        "accurate and slightly larger)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="dtype of the tensors that stay unquantized (default: the checkpoint's; float16 "
                        "becomes bfloat16)")
    vision = parser.add_argument("--quantize-vision", action="store_true", dest="vision",
                                 help="quantize the image encoder too (smaller, less exact; the references keep "
                                 "it in floating point)")
    output = parser.add_argument("--quantize-output", action="store_true", dest="output",
                                 help="quantize the output layer too (GLM-4V-9B; ChatGLM-6B's is tied to its "
                                 "embeddings)")
    overwrite = parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    # Earlier spellings, still accepted.
    for old, action in (("--vision", vision), ("--output", output), ("--force", overwrite)):
        add_hidden_alias(parser, old, action)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from visualglm.checkpoint.quantize_checkpoint import quantize_checkpoint

    result = quantize_checkpoint(args.src, args.dst, args.bits, group_size=args.group_size, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=sys.stderr.isatty(),
                                 also=tuple(part for part in ("vision", "output") if getattr(args, part)))
    kind = f"INT{result.bits}" + (f" (group {result.group_size})" if result.group_size else "")
    tokenizer = ", ".join(result.copied) if result.copied else "none found in SRC"
    print(f"wrote {result.directory}: {FAMILY_NAMES[result.family]}, {result.modules} linears in {kind}, "
          f"{result.bytes / 1024**3:.2f} GiB of weights; tokenizer files: {tokenizer}")
    return 0
