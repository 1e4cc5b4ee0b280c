"""A human-readable summary of a checkpoint directory, read from config.json and the file headers."""

from __future__ import annotations

from pathlib import Path

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.load import build_model, read_checkpoint_config, weight_files
from visualglm.config import FAMILY_NAMES


def describe_checkpoint(path_or_name: str | Path) -> str:
    directory = resolve_checkpoint_dir(path_or_name)
    config = read_checkpoint_config(directory)
    model = build_model(config)  # meta device: shapes only
    unique = {id(p): p.numel() for p in model.parameters()}
    files = weight_files(directory)
    size = sum(f.stat().st_size for f in files)
    lines = [
        f"directory:  {directory}",
        f"family:     {FAMILY_NAMES[config.family]}",
        f"parameters: {_count(sum(unique.values()))}",
        f"stored as:  {config.torch_dtype}, {len(files)} file(s), {size / 1024**3:.2f} GiB",
        f"layers:     {config.num_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
        f"vocab {config.vocab_size}, context {config.max_sequence_length}",
    ]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
