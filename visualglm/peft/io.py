"""Adapter files in the ``peft`` library's layout, readable by ``peft`` and by us.

A directory holds ``adapter_config.json`` (``peft_type`` LORA or PREFIX_TUNING and their fields) and
``adapter_model.safetensors``:
- LoRA: ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``.
  Our module paths are the official checkpoints' names, so the same keys fit the reference HF models.
  ``target_modules`` lists the adapted modules by full name (unambiguous for ``peft``'s suffix matching).
- P-tuning v2: ``prompt_embeddings`` ``[P, L * 2 * hidden]`` (the projected table, as ``peft`` saves it).
``visualglm_adapter.json`` adds what ``peft`` has no field for (method, model family, quantization the
adapter was trained against); ``peft`` ignores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visualglm.config import read_json_object
from visualglm.peft.lora import LoraConfig, LoRALinear, inject_lora, lora_modules
from visualglm.peft.ptuning import PrefixEncoder, inject_ptuning, prefix_encoder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_FILE_BIN = "adapter_model.bin"
METADATA_FILE = "visualglm_adapter.json"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that cannot be applied; the message names the file and the problem."""


def adapter_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` dict and the tensors (peft key names) of the model's adapter."""
    loras = lora_modules(model)
    encoder = prefix_encoder(model)
    if loras and encoder is not None:
        raise AdapterError("the model has both LoRA and P-tuning adapters; peft's layout holds one per directory")
    if loras:
        first = next(iter(loras.values()))
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
            "r": first.rank, "lora_alpha": first.alpha,
            "lora_dropout": getattr(first.lora_dropout, "p", 0.0),
            "target_modules": sorted(loras), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "use_rslora": False, "use_dora": False,
            "rank_pattern": {n: m.rank for n, m in loras.items() if m.rank != first.rank},
            "alpha_pattern": {n: m.alpha for n, m in loras.items() if m.alpha != first.alpha},
        }
        tensors = {}
        for name, module in loras.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            tensors[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
        return config, tensors
    if encoder is not None:
        config = {
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "revision": None, "inference_mode": True, "num_virtual_tokens": encoder.pre_seq_len,
            "token_dim": encoder.hidden_size, "num_transformer_submodules": 1,
            "num_attention_heads": encoder.num_heads, "num_layers": encoder.num_layers,
            "encoder_hidden_size": encoder.hidden_size, "prefix_projection": False,
        }
        with torch.no_grad():
            return config, {"prompt_embeddings": encoder.table()}
    raise AdapterError("the model has no LoRA or P-tuning adapter to save")


def save_adapter(model: nn.Module, directory: str | Path, *, base_model: str | None = None,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write the model's adapter into ``directory`` (created if needed; existing adapter files replaced).

    For an all-or-nothing write, give a staging directory and rename it afterwards (the trainer does).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, tensors = adapter_state(model)
    config["base_model_name_or_path"] = None if base_model is None else str(base_model)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    info = {"family": getattr(getattr(model, "config", None), "family", None), **(metadata or {})}
    (directory / METADATA_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} is not an adapter directory: no {CONFIG_FILE}")
    config = read_json_object(path, AdapterError)
    if "peft_type" not in config:
        raise AdapterError(f"{path}: expected a JSON object with a peft_type")
    return config


def read_adapter_metadata(directory: str | Path) -> dict[str, Any]:
    """Our ``visualglm_adapter.json`` (empty for adapters written by other tools)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        return {}
    return read_json_object(path, AdapterError)


def read_adapter_tensors(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return path, load_file(str(path))
        except Exception as exc:
            raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None
    path = directory / WEIGHTS_FILE_BIN
    if path.is_file():
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{path}: not a readable tensor file ({exc})") from None
    raise AdapterError(f"{directory}: no {WEIGHTS_FILE} (or {WEIGHTS_FILE_BIN})")


def _module_name(key: str) -> tuple[str, str] | None:
    """``base_model.model.<name>.lora_A[.<adapter>].weight`` -> (name, "lora_A"/"lora_B")."""
    key = key.removeprefix(PREFIX)
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0], part
    return None


def apply_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add the adapter stored in ``adapter_dir`` (peft layout, ours or the ``peft`` library's) to ``model``.

    LoRA: the adapted modules and ranks come from the tensor names and shapes, alpha from the config
    (``alpha_pattern`` honoured, ``use_rslora`` scales by alpha/sqrt(r)). Prefix tuning: the
    ``prompt_embeddings`` table becomes a P-tuning prefix. Returns the model (in eval mode).
    """
    config = read_adapter_config(adapter_dir)
    path, tensors = read_adapter_tensors(adapter_dir)
    peft_type = config["peft_type"]
    if peft_type == "LORA":
        _apply_lora(model, config, path, tensors)
    elif peft_type == "PREFIX_TUNING":
        _apply_prefix(model, config, path, tensors)
    else:
        raise AdapterError(f"{Path(adapter_dir) / CONFIG_FILE}: peft_type {peft_type!r} is not supported "
                           "(LORA and PREFIX_TUNING are)")
    return model.eval()


def _apply_lora(model: nn.Module, config: dict, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    where = path.parent / CONFIG_FILE
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise AdapterError(f"{where}: {flag}=true is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = _module_name(key)
        if found is None:
            raise AdapterError(f"{path}: unexpected key {key!r} in a LoRA adapter")
        pairs.setdefault(found[0], {})[found[1]] = tensor
    known = dict(model.named_modules())
    missing = sorted(n for n in pairs if n not in known)
    if missing:
        raise AdapterError(f"{path}: the model has no module(s) {missing[:4]}"
                           f"{' ...' if len(missing) > 4 else ''} (adapter made for another model?)")
    alpha_default = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    dropout = float(config.get("lora_dropout", 0.0))
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {name} lacks {({'lora_A', 'lora_B'} - set(pair)).pop()}")
        a, b = pair["lora_A"], pair["lora_B"]
        rank = a.shape[0]
        alpha = next((float(v) for k, v in alpha_pattern.items() if name == k or name.endswith("." + k)),
                     alpha_default)
        if config.get("use_rslora"):
            alpha = alpha * rank / rank**0.5  # our scaling is alpha / r; rsLoRA's is alpha / sqrt(r)
        if isinstance(known[name], LoRALinear):
            raise AdapterError(f"{name} already has a LoRA adapter (apply one adapter per model)")
        inject_lora(model, LoraConfig(rank=rank, alpha=alpha, dropout=dropout), names=[name])
        module = model.get_submodule(name)
        for part, tensor in (("lora_A", a), ("lora_B", b)):
            target = getattr(module, part).weight
            if tuple(tensor.shape) != tuple(target.shape):
                raise AdapterError(f"{path}: {name}.{part} has shape {tuple(tensor.shape)}, the module expects "
                                   f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
        module.requires_grad_(False)


def _apply_prefix(model: nn.Module, config: dict, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{path}: a prefix-tuning adapter needs a 'prompt_embeddings' tensor")
    table = tensors["prompt_embeddings"]
    model_config = model.config
    encoder: PrefixEncoder = inject_ptuning(model, table.shape[0], prefix_projection=False, dropout=0.0)
    if tuple(table.shape) != tuple(encoder.embedding.weight.shape):
        raise AdapterError(f"{path}: prompt_embeddings has shape {tuple(table.shape)}; this model "
                           f"({model_config.num_layers} layers, hidden {model_config.hidden_size}) expects "
                           f"{tuple(encoder.embedding.weight.shape)}")
    with torch.no_grad():
        encoder.embedding.weight.copy_(table)
    encoder.requires_grad_(False)
