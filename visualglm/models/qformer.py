"""BLIP-2 Q-Former of VisualGLM-6B with sat's post-LN layer semantics.

Layer i (``a`` = normalised input)::

    a = LN_in(x);  h = a + SelfAttn(a);  m = LN_post(h)
    if cross layer:  m = LN_cross(m + CrossAttn(m, image_tokens))
    out = m + MLP(m)                       # not normalised: the next layer's LN_in does it

so layer 0's ``input_layernorm`` plays BERT's embedding LayerNorm over the learned queries, and a final
LayerNorm follows the last layer. Cross-attention (layers with ``is_decoder``) reads the ViT tokens through
a ``key_value`` projection split into contiguous ``[K|V]`` halves.
"""

from __future__ import annotations

import torch
from torch import nn

from visualglm.config import QFormerConfig
from visualglm.models.eva_vit import FusedSelfAttention, GeluMLP
from visualglm.models.layers import attention


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, encoder_hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(encoder_hidden, 2 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        """x ``[B, Q, hidden]``, encoder ``[B, S, encoder_hidden]`` -> ``[B, Q, hidden]``."""
        batch, queries, hidden = x.shape
        head_dim = hidden // self.heads
        q = self.query(x).view(batch, queries, self.heads, head_dim).transpose(1, 2)
        k, v = self.key_value(encoder).view(batch, encoder.shape[1], 2, self.heads, head_dim).unbind(2)
        out = attention(q, k.transpose(1, 2), v.transpose(1, 2), None)
        return self.dense(out.transpose(1, 2).reshape(batch, queries, hidden))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, cross: bool) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = FusedSelfAttention(h, config.num_attention_heads)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        if cross:
            self.cross_attention = CrossAttention(h, config.cross_attn_hidden_size, config.num_attention_heads)
            self.post_cross_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.cross = cross
        self.mlp = GeluMLP(h, config.ffn_size)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        a = self.input_layernorm(x)
        m = self.post_attention_layernorm(a + self.attention(a))
        if self.cross:
            m = self.post_cross_attention_layernorm(m + self.cross_attention(m, image_tokens))
        return m + self.mlp(m)


class _Transformer(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)  # the learned queries
        self.layers = nn.ModuleList(QFormerLayer(config, bool(config.is_decoder[i]))
                                    for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class QFormer(nn.Module):
    """ViT tokens ``[B, S, encoder_hidden]`` -> query outputs ``[B, num_queries, hidden]``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.transformer = _Transformer(config)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        x = self.transformer.word_embeddings.weight.unsqueeze(0).expand(image_tokens.shape[0], -1, -1)
        for layer in self.transformer.layers:
            x = layer(x, image_tokens)
        return self.transformer.final_layernorm(x)
