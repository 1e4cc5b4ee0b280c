"""Write a model in the official HF layout: config.json + safetensors shards (+ index when sharded).

A model with weight-only quantized linears is written with its quantized tensors as they are (see
``visualglm.checkpoint.quantized`` for the tensors and the ``quantization_config`` entry of config.json);
loading it back gives the identical model without quantizing again.

Writes go to a temporary directory beside the target that is renamed into place at the end, so an
interrupted save never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from visualglm.checkpoint.keymaps import invert
from visualglm.checkpoint.quantized import QUANT_CONFIG_KEY, map_module_key, quantization_config, quantized_modules
from visualglm.checkpoint.staging import staged_directory
from visualglm.config import write_config
from visualglm.families import family_spec


def source_state_dict(model: nn.Module, fmt: str = "hf") -> dict[str, torch.Tensor]:
    """The model's tensors under the source format's key names (tied aliases written like the original)."""
    config = model.config
    to_source = invert(family_spec(config).keymap(fmt))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        source = map_module_key(name, to_source)
        if source is None:
            continue
        out[source] = tensor
    return out


def save_checkpoint(model: nn.Module, directory: str | Path, *, max_shard_bytes: int = 2 * 1024**3,
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Save ``model`` to ``directory`` (created; must not exist unless ``overwrite``). Returns the path."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace it)")
    quant_entry = quantization_config(model)
    state = source_state_dict(model)
    # Scales of quantized modules keep their own dtype: they are part of the quantized format.
    to_source = invert(family_spec(model).keymap("hf"))
    fixed = {map_module_key(f"{m}.{t}", to_source) for m in quantized_modules(model)
             for t in ("scale", "scales_and_zeros")}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and k not in fixed else v for k, v in state.items()}
    # safetensors refuses tensors that share storage (tied weights): give each its own contiguous copy.
    seen: set[int] = set()
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        state[key] = value.contiguous() if ptr not in seen else value.clone()
        seen.add(ptr)

    shards = _split(state, max_shard_bytes)
    with staged_directory(directory) as staging:
        if len(shards) == 1:
            save_file(shards[0], str(staging / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        stored = dtype or next(v.dtype for k, v in state.items() if v.is_floating_point() and k not in fixed)
        extra = {k: v for k, v in model.config.extra.items() if k not in (QUANT_CONFIG_KEY, "quantization_bit")}
        if quant_entry is not None:
            extra[QUANT_CONFIG_KEY] = quant_entry
        # THUDM's pre-quantized format is a config field of the families that have it: written as 0 (not quantized
        # that way), since the quantized modules are recorded in quantization_config.
        has_thudm_bits = any(f.name == "quantization_bit" for f in dataclasses.fields(model.config))
        changes = {"quantization_bit": 0} if has_thudm_bits else {}
        config = dataclasses.replace(model.config, torch_dtype=str(stored).removeprefix("torch."), extra=extra,
                                     **changes)
        write_config(config, staging)
    return directory


def _split(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards
