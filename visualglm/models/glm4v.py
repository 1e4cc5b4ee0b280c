"""GLM-4V-9B: EVA2-CLIP-E vision tower + 2x2 conv + GLU projection, spliced into the GLM-4 decoder.

image ``[B, 3, S, S]`` -> patches + CLS + positions -> layers with the norm AFTER each sub-layer
(``x + LN(Attn(x))``, ``x + LN(MLP(x))``, no final norm) -> drop CLS -> 2x2 conv -> GLU ->
``[boi, N vectors, eoi] / scaling_factor``. The three prompt placeholders ``<boi><|endoftext|><eoi>`` are
replaced by those N + 2 vectors; all N share one position (see ``glm4_prompt_inputs``). Text-only prompts
never touch the tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.config import GLM4VConfig, GLM4VisionConfig
from visualglm.models.eva_vit import FusedSelfAttention
from visualglm.models.glm4 import GLM4ForCausalLM
from visualglm.models.layers import splice_image_embeddings


class _PatchEmbedding(nn.Module):
    def __init__(self, config: GLM4VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_embedding.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class _MLP(nn.Module):
    def __init__(self, config: GLM4VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PostSublayerNormBlock(nn.Module):
    """``x + LN1(Attn(x))`` then ``+ LN2(MLP(.))``: EVA2-CLIP-E normalises sub-layer outputs."""

    def __init__(self, config: GLM4VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = FusedSelfAttention(config.hidden_size, config.num_heads)
        self.mlp = _MLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class _VisionTransformer(nn.Module):
    def __init__(self, config: GLM4VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PostSublayerNormBlock(config) for _ in range(config.num_hidden_layers))


class GLUProjection(nn.Module):
    """``linear_proj -> LayerNorm -> GELU -> silu(gate_proj) * dense_h_to_4h -> dense_4h_to_h``."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPVision(nn.Module):
    """Checkpoint prefix ``transformer.vision.``: images -> ``[B, N + 2, hidden]`` (boi, N, eoi)."""

    def __init__(self, config: GLM4VConfig) -> None:
        super().__init__()
        vision = config.vision_config
        self.scaling_factor = vision.scaling_factor
        self.patch_embedding = _PatchEmbedding(vision)
        self.transformer = _VisionTransformer(vision)
        self.conv = nn.Conv2d(vision.hidden_size, config.hidden_size, kernel_size=2, stride=2)
        self.linear_proj = GLUProjection(config.hidden_size, config.ffn_hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """ViT tokens after the last layer ``[B, 1 + P, vision_hidden]`` (CLS first)."""
        x = self.patch_embedding(images)
        for layer in self.transformer.layers:
            x = layer(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encode_patches(images)[:, 1:]
        batch, patches, hidden = x.shape
        grid = int(patches**0.5)
        x = self.conv(x.reshape(batch, grid, grid, hidden).permute(0, 3, 1, 2))
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat((self.boi.expand(batch, -1, -1), x, self.eoi.expand(batch, -1, -1)), dim=1)
        return x / self.scaling_factor


class GLM4VForCausalLM(GLM4ForCausalLM):
    """GLM-4V-9B; images enter as embeddings, so the decoder interface is unchanged."""

    def __init__(self, config: GLM4VConfig) -> None:
        super().__init__(config)
        self.transformer.vision = EVA2CLIPVision(config)

    @property
    def image_tokens(self) -> int:
        """Vectors one image occupies in the expanded prompt (boi + N + eoi)."""
        return self.config.vision_config.num_image_tokens + 2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values ``[B, 3, S, S]`` -> ``[B, N + 2, hidden]`` in the LM dtype."""
        vision = self.transformer.vision
        embeds = vision(images.to(vision.patch_embedding.proj.weight.dtype))
        return embeds.to(self.transformer.embedding.word_embeddings.weight.dtype)

    def expand_image_placeholders(self, ids: list[int]) -> tuple[list[int], int | None]:
        """Token ids with ``<boi><|endoftext|><eoi>`` widened to ``<boi>`` + N placeholder ids + ``<eoi>``,
        and the index of ``<boi>`` (None when the prompt has no image)."""
        config = self.config
        if config.boi_token_id not in ids:
            return list(ids), None
        start = ids.index(config.boi_token_id)
        if start + 2 >= len(ids) or ids[start + 2] != config.eoi_token_id:
            raise ValueError("the image placeholder must be <|begin_of_image|> <|endoftext|> <|end_of_image|>")
        middle = [ids[start + 1]] * config.vision_config.num_image_tokens
        return ids[: start + 1] + middle + ids[start + 2:], start

    def embed_with_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                          image_starts) -> torch.Tensor:
        """Embeddings of expanded ids ``[B, T]`` with row b's ``[start, start + N + 2)`` replaced by
        ``image_embeds[b]`` (boi, N vectors, eoi)."""
        return splice_image_embeddings(self.embed(input_ids), image_embeds, image_starts)
