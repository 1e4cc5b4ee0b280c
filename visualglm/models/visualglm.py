"""VisualGLM-6B: ChatGLM-6B whose prompt carries 32 image embeddings from a BLIP-2 bridge.

image ``[B, 3, 224, 224]`` -> EVA ViT -> ``[B, 257, 1408]`` -> Q-Former -> ``[B, 32, 768]`` -> ``glm_proj``
-> ``[B, 32, 4096]``, written over the embeddings of 32 placeholder tokens in the prompt. Image tokens are
ordinary context tokens (positions, block id 0, bidirectional prefix), so the decoder, its cache and the
engine see nothing but embeddings coming in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visualglm.config import VisualGLMConfig
from visualglm.models.chatglm import ChatGLMForCausalLM
from visualglm.models.eva_vit import EvaViT
from visualglm.models.layers import splice_image_embeddings
from visualglm.models.qformer import QFormer


class BLIP2(nn.Module):
    """The image encoder (checkpoint prefix ``image_encoder.``)."""

    def __init__(self, config: VisualGLMConfig) -> None:
        super().__init__()
        self.vit = EvaViT(config.eva_config)
        self.qformer = QFormer(config.qformer_config)
        self.glm_proj = nn.Linear(config.qformer_config.hidden_size, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, H, W]`` -> ``[B, image_length, hidden]``."""
        return self.glm_proj(self.qformer(self.vit(images)))


class VisualGLMForCausalLM(ChatGLMForCausalLM):
    """ChatGLM-6B plus ``image_encoder``; same forward interface (images enter as ``inputs_embeds``)."""

    def __init__(self, config: VisualGLMConfig) -> None:
        super().__init__(config)
        self.image_encoder = BLIP2(config)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values ``[B, 3, H, W]`` -> image embeddings ``[B, image_length, hidden]`` (LM dtype)."""
        # An embedding table's dtype: linears may hold int8/uint8 weights when the encoder is quantized.
        encoder_dtype = self.image_encoder.vit.transformer.position_embeddings.weight.dtype
        embeds = self.image_encoder(images.to(encoder_dtype))
        return embeds.to(self.transformer.word_embeddings.weight.dtype)

    def embed_with_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                          image_starts: Sequence[int | None]) -> torch.Tensor:
        """Token embeddings ``[B, T, hidden]`` with row b's slots ``[start, start + image_length)``
        replaced by ``image_embeds[b]`` (rows whose start is None stay text-only)."""
        return splice_image_embeddings(self.embed(input_ids), image_embeds, image_starts)
