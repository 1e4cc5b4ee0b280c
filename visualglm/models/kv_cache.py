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

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_length: int | None = None,
               rows: slice | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``[B, H, T, D]`` and return the keys/values ``[B, H, kv_length, D]`` to attend to.

        ``rows`` are the cache rows of the batch: None (all of them, B == batch size), a slice (views, no
        copy) or a LongTensor ``[B]`` of row indices (the returned slots are gathered). ``positions`` are
        the slots written: ``[T]``, the same for every row, or ``[B, T]``, each row its own (rows of a
        continuous batch have different lengths). ``kv_length`` None: every slot.
        """
        self.write(positions, k, v, rows)
        return self.read(kv_length, rows)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              rows: slice | torch.Tensor | None = None) -> None:
        """Write ``k``/``v`` ``[B, H, T, D]`` to slots ``positions`` of cache ``rows`` (as in ``update``)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(rows, torch.Tensor):
            slots = positions if positions.dim() == 2 else positions.expand(k.shape[0], -1)
            index = (rows[:, None], slice(None), slots)
            self.k[index], self.v[index] = k.transpose(1, 2), v.transpose(1, 2)
            return
        cache_k, cache_v = (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])
        if positions.dim() == 1:
            cache_k.index_copy_(2, positions, k)
            cache_v.index_copy_(2, positions, v)
        else:
            index = (torch.arange(k.shape[0], device=k.device)[:, None], slice(None), positions)
            cache_k[index], cache_v[index] = k.transpose(1, 2), v.transpose(1, 2)

    def read(self, kv_length: int | None = None, rows: slice | torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, kv_length, D]`` of cache ``rows`` (None: all rows; a LongTensor: gathered;
        ``kv_length`` None: every slot)."""
        length = self.max_length if kv_length is None else kv_length
        if isinstance(rows, torch.Tensor):
            return self.k[rows, :, :length], self.v[rows, :, :length]
        cache_k, cache_v = (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])
        return cache_k[:, :, :length], cache_v[:, :, :length]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (indices ``[B']``): new, smaller tensors."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


class CachedAttentionModel:
    """Cache management shared by the decoders. A model lists its attention modules (each with a
    ``kv_cache`` attribute) and the cache's ``(heads, head_dim)``; the engine sizes the cache through
    these methods."""

    def attention_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def kv_cache_layout(self) -> tuple[int, int]:
        """(key/value heads, head dim) of one layer's cache."""
        raise NotImplementedError

    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
        """Preallocate a ``[batch_size, heads, max_length, head_dim]`` cache in every layer (default dtype
        and device: those of the input embeddings; bf16 when they are not floating point)."""
        ref = self.get_input_embeddings().weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.bfloat16)
        heads, head_dim = self.kv_cache_layout()
        for attention in self.attention_modules():
            attention.kv_cache = KVCache(batch_size, heads, max_length, head_dim, dtype, device or ref.device)

    def kv_cache_size(self) -> tuple[int, int] | None:
        """(batch_size, max_length) of the allocated cache, or None."""
        cache = self.attention_modules()[0].kv_cache
        return None if cache is None else (cache.k.shape[0], cache.max_length)

    def select_kv_cache_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (indices ``[B']``) of every layer's cache (rows that left a batch)."""
        for attention in self.attention_modules():
            attention.kv_cache.select_rows(rows)

    def delete_kv_cache(self) -> None:
        for attention in self.attention_modules():
            attention.kv_cache = None
