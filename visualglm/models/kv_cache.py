"""Static, preallocated key/value cache.

The engine sizes the cache once (batch, max length); every forward writes the keys/values of its tokens at
explicit slot indices. Shapes never change while decoding, which keeps ``torch.compile``/CUDA graphs usable
and lets a chat session keep the slots of an earlier turn and overwrite only what changed.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer, laid out ``[batch, heads, max_length, head_dim]``."""

    def __init__(self, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_heads, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``[B, H, T, D]`` at slots ``positions`` ``[T]``; return the full cache tensors."""
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))
        return self.k, self.v
