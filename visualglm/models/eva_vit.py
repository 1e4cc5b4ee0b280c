"""EVA-CLIP ViT of VisualGLM-6B (BLIP-2's image encoder, last layer dropped).

Pre-LN transformer over a CLS token plus 14x14 patches with learned absolute positions, exact GELU,
fused contiguous ``[Q|K|V]`` projection, no final LayerNorm; BLIP-2's ``ln_vision`` (eps 1e-5) then
normalises all tokens, CLS included. Module names follow the sat checkpoint keys under
``image_encoder.vit.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.config import EvaViTConfig
from visualglm.models.layers import attention


class FusedSelfAttention(nn.Module):
    """Bidirectional self-attention with a contiguous ``[Q|K|V]`` projection (sat's default layout)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]``."""
        batch, length, hidden = x.shape
        q, k, v = self.query_key_value(x).view(batch, length, 3, self.heads, hidden // self.heads).unbind(2)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)
        return self.dense(out.transpose(1, 2).reshape(batch, length, hidden))


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, inner)
        self.dense_4h_to_h = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class PreLNBlock(nn.Module):
    """``x + Attn(LN1(x))`` then ``+ MLP(LN2(.))``."""

    def __init__(self, config: EvaViTConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)
        self.attention = FusedSelfAttention(h, config.num_attention_heads)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)
        self.mlp = GeluMLP(h, config.inner_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _Transformer(nn.Module):
    def __init__(self, config: EvaViTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(1, config.hidden_size)  # the CLS vector (sat feeds input id 0)
        self.position_embeddings = nn.Embedding(config.max_sequence_length, config.hidden_size)
        self.layers = nn.ModuleList(PreLNBlock(config) for _ in range(config.num_layers))


class _PatchEmbedding(nn.Module):
    def __init__(self, config: EvaViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)


class _ClsHead(nn.Module):
    def __init__(self, config: EvaViTConfig) -> None:
        super().__init__()
        self.ln_vision = nn.LayerNorm(config.hidden_size)  # PyTorch default eps 1e-5, as BLIP-2


class _Mixins(nn.Module):
    def __init__(self, config: EvaViTConfig) -> None:
        super().__init__()
        self.patch_embedding = _PatchEmbedding(config)
        self.cls = _ClsHead(config)


class EvaViT(nn.Module):
    """Images ``[B, 3, H, W]`` -> tokens ``[B, 1 + (H/p)*(W/p), hidden]`` after ``ln_vision``."""

    def __init__(self, config: EvaViTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = _Transformer(config)
        self.mixins = _Mixins(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.mixins.patch_embedding.proj(images).flatten(2).transpose(1, 2)  # [B, N, hidden]
        cls = self.transformer.word_embeddings.weight.expand(patches.shape[0], 1, -1)
        x = torch.cat((cls, patches), dim=1)
        x = x + self.transformer.position_embeddings.weight[: x.shape[1]]
        for block in self.transformer.layers:
            x = block(x)
        return self.mixins.cls.ln_vision(x)
