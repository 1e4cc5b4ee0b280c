"""Convert any checkpoint we can read (HF layout, sat layout) into the official HF layout with safetensors.

The output directory appears complete or not at all: everything is written into a staging directory beside
it and renamed into place at the end.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.io import parse_dtype
from visualglm.checkpoint.load import load
from visualglm.checkpoint.sat import QKV_LAYOUTS
from visualglm.checkpoint.save import save_checkpoint
from visualglm.checkpoint.staging import check_target, paths_overlap, staged_directory

# Tokenizer files a checkpoint directory may carry (ChatGLM-6B's SentencePiece model and its settings).
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")

DEFAULT_SHARD_BYTES = 2 * 1024**3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "K": 1024, "M": 1024**2, "G": 1024**3,
          "T": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or a plain number. As in the ``save_pretrained``
    convention, ``GB`` means 10^9 bytes and ``GiB`` 2^30; a bare ``G`` is taken as 2^30."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match or match.group(2) is not None and match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read a size from {text!r} (examples: 2GB, 500MB, 1.5GiB, 1000000)")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


@dataclass
class ConvertResult:
    directory: Path
    family: str
    tensors: int
    shards: int
    dtype: str
    copied: list[str]


def convert_checkpoint(source: str | Path, target: str | Path, *, dtype: str | torch.dtype | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, qkv_layout: str = "auto",
                       overwrite: bool = False, progress: bool = True) -> ConvertResult:
    """Read ``source`` (HF or sat layout, a known name or a hub id) and write it to ``target`` in the HF
    layout: ``config.json`` + safetensors shards (+ index) + the tokenizer files found in ``source``.

    ``dtype`` None keeps every tensor's stored dtype. ``target`` must not exist or be empty unless
    ``overwrite``; it may not overlap the source.
    """
    if qkv_layout not in QKV_LAYOUTS:
        raise ValueError(f"qkv_layout must be one of {', '.join(QKV_LAYOUTS)}; got {qkv_layout!r}")
    torch_dtype = parse_dtype(dtype)
    target = Path(target)
    check_target(target, overwrite, flag="--overwrite")
    source_dir = resolve_checkpoint_dir(source)
    if paths_overlap(source_dir, target):
        raise ValueError(f"target {target} overlaps the source {source_dir}: choose another directory")
    model = load(source_dir, dtype=torch_dtype or "stored", qkv_layout=qkv_layout, progress=progress,
                 fast_cpu_kernels=False)
    with staged_directory(target) as staging:
        written = save_checkpoint(model, staging, max_shard_bytes=max_shard_bytes, dtype=torch_dtype,
                                  overwrite=True)
        copied = []
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, written / name)
                copied.append(name)
        shards = len(list(written.glob("*.safetensors")))
        check_target(target, overwrite, flag="--overwrite")  # nothing appeared meanwhile
    tensors = len({id(p) for p in model.parameters()})
    dtypes = sorted({str(torch_dtype or p.dtype).removeprefix("torch.") for p in model.parameters()})
    return ConvertResult(target, model.config.family, tensors, shards, "+".join(dtypes), copied)

