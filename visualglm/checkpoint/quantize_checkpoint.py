"""Write a weight-only quantized copy of a checkpoint (``visualglm quantize``).

The source is read and quantized tensor by tensor (``visualglm.load(..., quantize=...)``), so the
full-precision model is never in memory; the result is written into a staging directory beside the target
and renamed into place at the end, so the target appears complete or not at all.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.io import parse_dtype
from visualglm.checkpoint.load import load
from visualglm.checkpoint.quantized import quantize_bits, quantized_modules
from visualglm.checkpoint.save import save_checkpoint
from visualglm.checkpoint.staging import check_target, paths_overlap, staged_directory
from visualglm.quant.linear import INT4_GROUP_SIZES

# Tokenizer files a checkpoint directory may carry: ChatGLM-6B's SentencePiece model, GLM-4's tiktoken
# ranks, and their settings.
TOKENIZER_FILES = ("ice_text.model", "tokenizer.model", "tokenizer_config.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass
class QuantizeResult:
    directory: Path
    family: str
    bits: int
    group_size: int | None
    modules: int
    bytes: int  # of the written weight files
    copied: list[str]


def quantize_checkpoint(source: str | Path, target: str | Path, bits: int | str, *, group_size: int | None = None,
                        dtype: str | torch.dtype | None = None, overwrite: bool = False, progress: bool = True,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, also: tuple[str, ...] = ()) -> QuantizeResult:
    """Quantize ``source`` (a checkpoint directory, known name or hub id; HF or sat layout, or already
    quantized to the same width) to ``bits`` and write it to ``target`` with the source's tokenizer files.

    ``group_size`` (INT4 only, default 128): input columns per scale. ``dtype``: the floating-point tensors
    that stay unquantized (default: the checkpoint's; float16 becomes bfloat16 on CPU). ``target`` must not
    exist or be empty unless ``overwrite``; it may not overlap the source. ``also`` names optional parts
    to quantize too (``"vision"``, ``"output"``; see ``FamilySpec.quant_optional``).
    """
    bits = quantize_bits(bits)
    if group_size is not None and bits == 8:
        raise ValueError("group size applies to INT4 only (INT8 has one scale per output row)")
    group_size = 128 if group_size is None else group_size
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    torch_dtype = parse_dtype(dtype)
    target = Path(target)
    check_target(target, overwrite, flag="--overwrite")
    source_dir = resolve_checkpoint_dir(source)
    if paths_overlap(source_dir, target):
        raise ValueError(f"target {target} overlaps the source {source_dir}: choose another directory")
    model = load(source_dir, dtype=torch_dtype, quantize=bits, quant_group_size=group_size, progress=progress,
                 fast_cpu_kernels=False, quantize_also=also)
    count = len(quantized_modules(model))
    if not count:
        raise ValueError(f"{source_dir}: nothing to quantize in this model")
    with staged_directory(target) as staging:
        written = save_checkpoint(model, staging, max_shard_bytes=max_shard_bytes, overwrite=True)
        copied = []
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, written / name)
                copied.append(name)
        size = sum(p.stat().st_size for p in written.glob("*.safetensors"))
        check_target(target, overwrite, flag="--overwrite")  # nothing appeared meanwhile
    group = model.quantization.get("group_size") if bits == 4 else None
    return QuantizeResult(target, model.config.family, bits, group, count, size, copied)

