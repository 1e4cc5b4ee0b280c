"""``BatchEncoding``: the dict of model inputs that tokenizers return, as in ``transformers``."""

from __future__ import annotations

from typing import Any

import torch


class BatchEncoding(dict):
    """Model inputs by name (``input_ids``, ``attention_mask``, ...), also readable as attributes
    (``inputs.input_ids``). ``.to(device)`` moves every tensor and returns the same object, so
    ``model.generate(**tokenizer(...).to(device))`` works as with ``transformers``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r} (fields: {', '.join(self)})") from None

    def to(self, device: str | int | torch.device) -> BatchEncoding:
        """Move every tensor to ``device`` (in place, like transformers); other values stay as they are."""
        if isinstance(device, torch.dtype):
            raise TypeError("BatchEncoding.to takes a device, not a dtype: the model casts images itself")
        for name, value in self.items():
            if isinstance(value, torch.Tensor):
                self[name] = value.to(device)
        return self
