"""P-tuning v2 (ChatGLM-6B's ``pre_seq_len`` / ``prefix_projection`` scheme) by composition.

A ``PrefixEncoder`` holds, for ``P = pre_seq_len`` virtual tokens, one key and one value per layer and head:
a table ``[P, L * 2 * hidden]`` (``nn.Embedding``), or with ``prefix_projection`` an ``Embedding(P, hidden)``
followed by ``Linear(hidden, hidden) -> tanh -> Linear(hidden, L * 2 * hidden)``. Column block ``l`` of width
``2 * hidden`` is layer l's ``(key, value)``, each viewed ``[heads, head_dim]`` (the reference's
``view(B, P, 2L, H, D)`` then ``split(2)``). Dropout 0.1 as in the reference; prefix keys are not rotated.

The encoder is attached as ``transformer.prefix_encoder`` (the reference's parameter names) and each
attention module gets an ``extra_kv`` callable that returns its layer's prefix; the attention puts those
keys/values first and lets every query see them. The model code knows nothing of P-tuning.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.peft.lora import freeze, route_frozen_quantized


class PrefixEncoder(nn.Module):
    """Virtual-token keys/values for every layer: ``layer_kv(l, B)`` -> (k, v), each ``[B, heads, P, head_dim]``."""

    def __init__(self, pre_seq_len: int, num_layers: int, hidden_size: int, num_heads: int,
                 prefix_projection: bool = False, dropout: float = 0.1,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be positive, got {pre_seq_len}")
        self.pre_seq_len, self.num_layers = pre_seq_len, num_layers
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.prefix_projection = prefix_projection
        width = num_layers * 2 * hidden_size
        if prefix_projection:
            self.embedding = nn.Embedding(pre_seq_len, hidden_size, device=device)
            self.trans = nn.Sequential(nn.Linear(hidden_size, hidden_size, device=device), nn.Tanh(),
                                       nn.Linear(hidden_size, width, device=device))
        else:
            self.embedding = nn.Embedding(pre_seq_len, width, device=device)
        self.dropout = nn.Dropout(dropout)
        self._cached_table: torch.Tensor | None = None  # eval mode only: the table does not change

    def table(self) -> torch.Tensor:
        """All layers' prefixes ``[P, L * 2 * hidden]`` (what the ``peft`` library saves as prompt_embeddings)."""
        if not self.prefix_projection:
            return self.embedding.weight
        return self.trans(self.embedding.weight)

    def train(self, mode: bool = True) -> PrefixEncoder:
        self._cached_table = None
        return super().train(mode)

    def _layer_table(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s ``[P, 2 * hidden]`` block, computing only that block of the projection."""
        width = 2 * self.hidden_size
        cols = slice(layer * width, (layer + 1) * width)
        if not self.prefix_projection:
            return self.embedding.weight[:, cols]
        if not self.training:
            if self._cached_table is None:
                with torch.no_grad():
                    self._cached_table = self.table()
            return self._cached_table[:, cols]
        last = self.trans[2]
        hidden = self.trans[1](self.trans[0](self.embedding.weight))
        return F.linear(hidden, last.weight[cols], last.bias[cols])

    def layer_kv(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.hidden_size // self.num_heads
        table = self._layer_table(layer).view(1, self.pre_seq_len, 2, self.num_heads, head_dim)
        kv = self.dropout(table.expand(batch_size, -1, -1, -1, -1))
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = model.attention_modules()
    if not modules or not all(hasattr(m, "extra_kv") for m in modules):
        raise ValueError("P-tuning v2 needs attention modules with an extra_kv hook (ChatGLM-6B and VisualGLM-6B); "
                         "use LoRA for this model")
    return modules


def inject_ptuning(model: nn.Module, pre_seq_len: int, prefix_projection: bool = False,
                   dropout: float = 0.1) -> PrefixEncoder:
    """Freeze ``model`` and attach a trainable ``PrefixEncoder`` as ``model.transformer.prefix_encoder``."""
    modules = _attention_modules(model)
    if getattr(model.transformer, "prefix_encoder", None) is not None:
        raise ValueError("the model already has a P-tuning prefix encoder")
    config = model.config
    freeze(model)
    route_frozen_quantized(model)
    device = model.get_input_embeddings().weight.device
    encoder = PrefixEncoder(pre_seq_len, len(modules), config.hidden_size, config.num_attention_heads,
                            prefix_projection, dropout, device=device)
    model.transformer.prefix_encoder = encoder
    for index, attention in enumerate(modules):
        # A partial, not a module: the encoder stays registered once, under transformer.prefix_encoder.
        attention.extra_kv = functools.partial(encoder.layer_kv, index)
    return encoder


def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    transformer = getattr(model, "transformer", None)
    encoder = getattr(transformer, "prefix_encoder", None)
    return encoder if isinstance(encoder, PrefixEncoder) else None


def remove_ptuning(model: nn.Module) -> None:
    """Detach the prefix encoder (the model is the plain base model again)."""
    for attention in _attention_modules(model):
        attention.extra_kv = None
    if prefix_encoder(model) is not None:
        del model.transformer.prefix_encoder
