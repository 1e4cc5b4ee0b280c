"""Parameter-efficient fine-tuning by composition: LoRA / QLoRA wrappers, P-tuning v2 prefixes, and adapter
files in the ``peft`` library's layout. Works on any model built by ``visualglm.models``."""

from visualglm.peft.io import AdapterError, apply_adapter, read_adapter_config, read_adapter_metadata, save_adapter
from visualglm.peft.lora import (
    LoraConfig,
    LoRALinear,
    count_parameters,
    dequantize_model,
    freeze,
    inject_lora,
    lora_modules,
    merge_lora,
)
from visualglm.peft.ptuning import PrefixEncoder, inject_ptuning, prefix_encoder, remove_ptuning

__all__ = [
    "AdapterError",
    "LoRALinear",
    "LoraConfig",
    "PrefixEncoder",
    "apply_adapter",
    "count_parameters",
    "dequantize_model",
    "freeze",
    "inject_lora",
    "inject_ptuning",
    "lora_modules",
    "merge_lora",
    "prefix_encoder",
    "read_adapter_config",
    "read_adapter_metadata",
    "remove_ptuning",
    "save_adapter",
]
