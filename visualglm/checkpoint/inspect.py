"""A human-readable summary of a checkpoint directory, read from config.json and the file headers."""

from __future__ import annotations

from pathlib import Path

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.io import build_model, is_sat_directory, read_checkpoint_config, weight_files
from visualglm.checkpoint.sat import config_from_sat, open_sat
from visualglm.families import family_spec


def describe_checkpoint(path_or_name: str | Path) -> str:
    directory = resolve_checkpoint_dir(path_or_name)
    if is_sat_directory(directory):
        checkpoint = open_sat(directory)
        config = config_from_sat(checkpoint.model_config)
        files = checkpoint.rank_files
        layout = f"sat, {checkpoint.mp_size} model-parallel rank(s)"
    else:
        config = read_checkpoint_config(directory)
        files = weight_files(directory)
        layout = f"Hugging Face, {config.torch_dtype}"
    model = build_model(config)  # meta device: shapes only
    unique = {id(p): p.numel() for p in model.parameters()}
    size = sum(f.stat().st_size for f in files)
    lines = [
        f"directory:  {directory}",
        f"family:     {family_spec(config).display_name}",
        f"parameters: {_count(sum(unique.values()))}",
        f"stored as:  {layout}, {len(files)} file(s), {size / 1024**3:.2f} GiB",
        f"layers:     {config.num_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
        f"vocab {config.vocab_size}, context {config.max_sequence_length}",
    ]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
