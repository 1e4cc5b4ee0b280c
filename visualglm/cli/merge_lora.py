"""``visualglm merge-lora``: fold a LoRA adapter into its base model and write a full checkpoint.

A QLoRA adapter is merged against the dequantized INT4/INT8 base it was trained with (the function the
adapter learned), and the result is a plain floating-point checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("ice_text.model", "tokenizer.model", "tokenizer_config.json")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge-lora", help="merge a LoRA adapter into a full checkpoint",
                                 description=__doc__)
    parser.add_argument("--model", help="base checkpoint the adapter was trained on (default: the shipped demo "
                        "model)")
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + "
                        "adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint (must not exist or be empty)")
    parser.add_argument("--dtype", default=None, help="dtype of the merged weights (default: the base model's)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import visualglm
    from visualglm.checkpoint.load import parse_dtype
    from visualglm.checkpoint.save import save_checkpoint
    from visualglm.demo import resolve_model
    from visualglm.peft import apply_adapter, dequantize_model, merge_lora, read_adapter_config, read_adapter_metadata

    model_path = resolve_model(args.model)
    config = read_adapter_config(args.adapter)
    if config["peft_type"] != "LORA":
        raise ValueError(f"{args.adapter} holds a {config['peft_type']} adapter: only LoRA adapters can be merged "
                         "into weights (use --adapter with chat/ask instead)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    metadata = read_adapter_metadata(args.adapter)
    bits = metadata.get("quant_bits") if metadata.get("method") == "qlora" else None
    model = visualglm.load(model_path, dtype=args.dtype, quantize=bits, fast_cpu_kernels=False, progress=False)
    apply_adapter(model, args.adapter)
    # Merged and dequantized weights take the base model's floating-point dtype unless --dtype says otherwise.
    dtype = parse_dtype(args.dtype) or model.get_input_embeddings().weight.dtype
    merged = merge_lora(model, dtype=dtype)
    if bits:
        dequantize_model(model, dtype)
    save_checkpoint(model, out)
    source = Path(getattr(model, "checkpoint_dir", model_path))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    against = f" against the dequantized INT{bits} base" if bits else ""
    print(f"merged {merged} LoRA module(s){against} into {out}", file=sys.stderr)
    return 0
