"""``visualglm convert SRC DST``: rewrite a checkpoint (HF or sat layout) as HF-layout safetensors."""

from __future__ import annotations

import argparse
import sys

from visualglm.checkpoint.convert import DEFAULT_SHARD_BYTES, convert_checkpoint, parse_size
from visualglm.checkpoint.sat import QKV_LAYOUTS
from visualglm.config import FAMILY_NAMES


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert", help="convert a checkpoint (HF or sat layout) to HF-layout safetensors",
        description="Load a checkpoint directory in the Hugging Face layout or SwissArmyTransformer's (sat: "
        "model_config.json + latest + <iter>/mp_rank_XX_model_states.pt, model-parallel ranks merged) and "
        "write config.json + safetensors shards to DST, with the tokenizer files found in SRC. DST appears "
        "complete or not at all.")
    parser.add_argument("src", metavar="SRC", help="checkpoint directory (or a known name / hub id)")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="store the weights in this dtype (default: keep each tensor's stored dtype)")
    parser.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                        help="largest safetensors shard, e.g. 2GB, 500MB, 1.5GiB (default: 2GiB)")
    parser.add_argument("--qkv-layout", choices=QKV_LAYOUTS, default="auto",
                        help="row order of ChatGLM's fused QKV in a sat checkpoint: contiguous (sat >= 0.4.1, "
                        "July 2023 on), interleaved (older sat) or auto (decides only when the checkpoint "
                        "shows it, otherwise asks for this flag)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.set_defaults(run=run)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    result = convert_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_bytes=args.shard_size,
                                qkv_layout=args.qkv_layout, overwrite=args.overwrite,
                                progress=sys.stderr.isatty())
    tokenizer = ", ".join(result.copied) if result.copied else "none found in SRC"
    print(f"wrote {result.directory}: {FAMILY_NAMES[result.family]}, {result.tensors} tensors, "
          f"{result.dtype}, {result.shards} shard(s); tokenizer files: {tokenizer}")
    return 0
