"""One way to load a model for inference: the shipped demo model by default, quantization, an adapter.

The command line (``chat``, ``ask``, ``serve``, ``web``) and the server's worker all load through
:func:`load_model`, so a flag means the same thing everywhere. It sits in ``demo`` because the default
model lives here and both ``serving`` and ``cli`` rank above it (tests/test_layering.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from visualglm.demo import DEMO_MODEL_NAME, resolve_model


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns; unpacks as ``model, tokenizer, name``."""

    model: nn.Module
    tokenizer: Any
    name: str  # for logs and the API's model field: the directory's or hub id's last part, or the demo's


def load_model(model: str | Path | None, *, dtype: str | None = None, device: str | torch.device = "cpu",
               quantize: int | None = None, quantize_also: tuple[str, ...] = (), adapter: str | Path | None = None,
               tensor_parallel: bool = False) -> LoadedModel:
    """Load ``model`` (a checkpoint directory, known name or hub id; None/empty: the shipped demo model) and
    its tokenizer, in eval mode.

    ``dtype``, ``device``, ``quantize`` (8 or 4, weight-only) and ``quantize_also`` (``"vision"``,
    ``"output"``) are those of :func:`visualglm.checkpoint.load.load`; ``adapter`` is a LoRA / P-tuning
    folder applied after the load; with ``tensor_parallel`` (under torchrun) this rank loads its shard only,
    which an adapter cannot be applied to (refused before the load)."""
    from visualglm.checkpoint.load import load
    from visualglm.checkpoint.tokenizer import load_tokenizer

    if adapter and tensor_parallel:
        raise ValueError("--adapter does not combine with tensor parallelism (--tp): merge it first with "
                         "visualglm merge-lora")
    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    loaded = load(path, dtype=dtype, device=device, quantize=quantize, quantize_also=quantize_also,
                  tensor_parallel=tensor_parallel)
    if adapter:
        from visualglm.peft import apply_adapter

        apply_adapter(loaded, adapter)
    return LoadedModel(loaded, tokenizer, model_name(model))


def model_name(model: str | Path | None) -> str:
    """The short name of ``model`` as :func:`load_model` reports it."""
    return DEMO_MODEL_NAME if not model else (Path(str(model)).name or str(model))
