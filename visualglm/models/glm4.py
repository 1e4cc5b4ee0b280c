"""GLM-4 decoder (the language model of GLM-4V-9B).

Pre-norm blocks with RMSNorm computed in float32, SwiGLU MLP, grouped-query attention (2 key/value groups,
cached before expansion), qkv bias only, and a partial interleaved rotary encoding: only the first half of
each head's dimensions rotate, in (2i, 2i+1) pairs, with the cos/sin table rounded to the model dtype as the
reference does. Positions are 1-D; the mask is causal over the whole sequence. Module names follow the
official checkpoint (``transformer.embedding...``, ``transformer.encoder.layers.N...``).

The decoder is typed with :class:`GLM4TextConfig`, the fields it reads: GLM-4V-9B's ``GLM4VConfig`` is one
(its ``vision_config`` is read by the vision tower in ``glm4v.py`` only), and so is any text-only config
with these fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.models.kv_cache import CachedAttentionModel, KVCache
from visualglm.models.layers import (
    LayerPass,
    attention_gqa,
    attention_span,
    chunked_layer,
    common_prefix_length,
    embeddings_of,
    flatten_groups,
    last_positions,
    run_stages,
    unflatten_groups,
)


@runtime_checkable
class GLM4TextConfig(Protocol):
    """What the GLM-4 text decoder reads from its config (read-only; dataclass fields or properties).

    Shapes, layers and positions are read by the modules below; ``max_sequence_length`` and
    ``pad_token_id`` by the generation engine through ``model.config``."""

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table and of the output layer."""

    @property
    def hidden_size(self) -> int:
        """The decoder width."""

    @property
    def ffn_hidden_size(self) -> int:
        """Width of one SwiGLU half."""

    @property
    def num_layers(self) -> int: ...

    @property
    def num_attention_heads(self) -> int:
        """Query heads."""

    @property
    def kv_heads(self) -> int:
        """Key/value groups (grouped-query attention); divides ``num_attention_heads``."""

    @property
    def kv_channels(self) -> int:
        """Head dimension; the first half rotates."""

    @property
    def layernorm_epsilon(self) -> float: ...

    @property
    def rope_ratio(self) -> float:
        """Scales the rotary base 10000."""

    @property
    def boi_token_id(self) -> int:
        """``<|begin_of_image|>``: image vectors after it share one position (``glm4_prompt_inputs``)."""

    @property
    def eoi_token_id(self) -> int:
        """``<|end_of_image|>``."""

    @property
    def pad_token_id(self) -> int: ...

    @property
    def max_sequence_length(self) -> int:
        """The context in tokens."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def glm4_rope_table(positions: torch.Tensor, rot_dim: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """cos/sin ``[*positions.shape, rot_dim // 2, 2]`` computed in fp32, rounded to half types like the
    reference's cache."""
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=positions.device) / rot_dim))
    angles = positions.float().unsqueeze(-1) * theta
    table = torch.stack((angles.cos(), angles.sin()), dim=-1)
    if dtype in (torch.float16, torch.bfloat16):
        table = table.to(dtype)
    return table


def apply_glm4_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, H, D]``; table ``[B, T, R/2, 2]``: rotate dims ``[0, R)`` in (2i, 2i+1) pairs, pass the rest."""
    rot = table.shape[-2] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    rotated = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin), -1)
    return torch.cat((rotated.flatten(-2).to(x.dtype), x_pass), dim=-1)


class GLM4Attention(nn.Module):
    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.kv_channels
        qkv_size = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=True)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        self.single_query = "matmul"  # the CPU decode-step kernel (see layers.SINGLE_QUERY_KERNELS), set at load

    def forward(self, x: torch.Tensor, rope: torch.Tensor, bias: torch.Tensor | None,
                cache_positions: torch.Tensor | None, kv_length: int, causal: bool,
                cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        return self.dense(self.mix(self.query_key_value(x), rope, bias, cache_positions, kv_length, causal,
                                   cache_rows))

    def mix(self, qkv: torch.Tensor, rope: torch.Tensor, bias: torch.Tensor | None,
            cache_positions: torch.Tensor | None, kv_length: int, causal: bool,
            cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` between its two linear layers: the heads ``[B, T, heads * D]`` (before ``dense``) of the
        projection ``qkv`` ``[B, T, (heads + 2 * kv_heads) * D]``."""
        qk, v = self.rotated(qkv, rope)
        return self.attend_heads(qk.flatten(-2), v, bias, cache_positions, kv_length, causal, cache_rows)

    def attend_heads(self, qk: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     cache_positions: torch.Tensor | None, kv_length: int, causal: bool,
                     cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """``mix`` after the rotation: rotated queries and keys ``qk`` ``[B, T, (heads + kv_heads) * D]``,
        values ``v`` ``[B, T, kv_heads * D]`` (as ``rotated`` gives them) -> the heads ``[B, T, heads * D]``."""
        batch, length, _ = qk.shape
        q, k, v = self.arranged(qk.view(batch, length, -1, self.head_dim), v)
        if cache_positions is not None:
            if self.kv_cache is None:
                raise RuntimeError("cache_positions given but no KV cache: call setup_kv_cache() first")
            k, v = self.kv_cache.update(cache_positions, k, v, kv_length, cache_rows)
        return self.heads_output(q, k, v, bias, causal)

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``[B, heads, T, D]``, rotated keys and values ``[B, kv_heads, T, D]`` of x."""
        return self.split_heads(self.query_key_value(x), rope)

    def rotated(self, qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[B, T, heads + kv_heads, D]`` rotated by ``rope`` ``[B, T, R/2, 2]``, and the values
        ``[B, T, kv_heads * D]`` of the projection ``qkv``. Queries and keys sit side by side in the projection
        and turn by the same table: one rotation for both halves the small ops of a decode step's rotary
        embedding."""
        batch, length, _ = qkv.shape
        qk, v = qkv.split([(self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        return apply_glm4_rope(qk.view(batch, length, self.heads + self.kv_heads, self.head_dim), rope), v

    def split_heads(self, qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``project`` after the linear layer."""
        return self.arranged(*self.rotated(qkv, rope))

    def arranged(self, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads first: queries ``[B, heads, T, D]``, keys and values ``[B, kv_heads, T, D]`` of ``qk``
        ``[B, T, heads + kv_heads, D]`` and ``v`` ``[B, T, kv_heads * D]`` (``rotated``'s output)."""
        batch, length = v.shape[:2]
        q, k = qk.transpose(1, 2).split([self.heads, self.kv_heads], dim=1)
        return q, k, v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               causal: bool = False) -> torch.Tensor:
        """The output ``[B, T, hidden]`` of queries ``[B, heads, T, D]`` over keys/values ``[B, kv_heads, S, D]``."""
        return self.dense(self.heads_output(q, k, v, bias, causal))

    def heads_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     causal: bool = False) -> torch.Tensor:
        """``attend`` before ``dense``: the heads' outputs side by side, ``[B, T, heads * D]``."""
        batch, _, length, _ = q.shape
        out = attention_gqa(q, k, v, bias, causal=causal, single_query=self.single_query)
        return out.transpose(1, 2).reshape(batch, length, -1)


class SwiGLU(nn.Module):
    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLM4Block(nn.Module):
    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = GLM4Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = SwiGLU(config)

    def forward(self, x, rope, bias, cache_positions, kv_length, causal, cache_rows=None):
        x = x + self.self_attention(self.input_layernorm(x), rope, bias, cache_positions, kv_length, causal,
                                    cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_joint(self, parts: Sequence[tuple[torch.Tensor, tuple]]) -> list[torch.Tensor]:
        """``forward`` for several groups of tokens at once (see ``GLMBlock.forward_joint``). Everything but
        attention runs on the groups' tokens as one matrix, the rotary embedding too (the groups' tables
        side by side)."""
        if len(parts) == 1:
            return [self(parts[0][0], *parts[0][1])]
        attention = self.self_attention
        flat, shapes = flatten_groups([x for x, _ in parts])  # [N, hidden]: every group's tokens
        table = torch.cat([args[0].reshape(-1, *args[0].shape[-2:]) for _, args in parts])  # [N, R/2, 2]
        # As one batch row of N tokens: qk [1, N, heads + kv_heads, D], v [1, N, kv_heads * D].
        qk, v = attention.rotated(attention.query_key_value(self.input_layernorm(flat))[None], table[None])
        heads = [attention.attend_heads(qk_i, v_i, *args[1:])
                 for qk_i, v_i, (_, args) in zip(unflatten_groups(qk[0].flatten(-2), shapes),
                                                 unflatten_groups(v[0], shapes), parts, strict=True)]
        flat = flat + attention.dense(flatten_groups(heads)[0])
        return unflatten_groups(flat + self.mlp(self.post_attention_layernorm(flat)), shapes)

    def write_keys(self, x: torch.Tensor, rope: torch.Tensor, cache_positions: torch.Tensor,
                   cache_rows: slice | torch.Tensor | None) -> torch.Tensor:
        """Write the keys/values of some of a prompt's tokens, return their queries (see
        ``GLMBlock.write_keys``)."""
        q, k, v = self.self_attention.project(self.input_layernorm(x), rope)
        self.self_attention.kv_cache.write(cache_positions, k, v, cache_rows)
        return q

    def finish(self, x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, kv_length: int,
               cache_rows: slice | torch.Tensor | None) -> torch.Tensor:
        """The rest of ``forward`` for the tokens ``write_keys`` took (see ``GLMBlock.finish``)."""
        k, v = self.self_attention.kv_cache.read(kv_length, cache_rows)
        x = x + self.self_attention.attend(q, k, v, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Embedding(nn.Module):
    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLM4Block(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class GLM4Transformer(nn.Module):
    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.embedding = _Embedding(config)
        self.encoder = _Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)


class GLM4ForCausalLM(CachedAttentionModel, nn.Module):
    """The GLM-4 language model with the same interface as the ChatGLM-6B class."""

    def __init__(self, config: GLM4TextConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GLM4Transformer(config)

    def tied_parameters(self) -> dict[str, str]:
        return {}

    def tie_weights(self) -> None:
        """Nothing to tie: GLM-4's output layer is a matrix of its own (``tied_parameters`` is empty)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embedding.word_embeddings(input_ids)

    # --- KV cache: keys/values stored per KV group, before expansion to the query heads ----------------
    def attention_modules(self) -> list[nn.Module]:
        return [block.self_attention for block in self.transformer.encoder.layers]

    def kv_cache_layout(self) -> tuple[int, int]:
        return self.config.kv_heads, self.config.kv_channels

    # --- positions ------------------------------------------------------------------------------------------
    def prompt_inputs(self, input_ids: torch.Tensor, num_pad: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        return glm4_prompt_inputs(input_ids, self.config, num_pad)

    @staticmethod
    def next_position_ids(last: torch.Tensor) -> torch.Tensor:
        return last + 1

    def reusable_prefix(self, cached_ids: Sequence[int], new_ids: Sequence[int]) -> int:
        """Causal attention: every slot of the common token prefix stays exact."""
        common = common_prefix_length(cached_ids, new_ids)
        return min(common, len(new_ids) - 1)

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache_positions=None,
                inputs_embeds=None, logits_to_keep: int = 0, cache_rows=None) -> torch.Tensor:
        """Logits ``[B, T', vocab]``; arguments as in ChatGLMForCausalLM.forward, position_ids ``[B, 1, T]``."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, cache_positions, inputs_embeds,
                                    cache_rows)
        if logits_to_keep > 0:
            hidden = last_positions(hidden, logits_to_keep)
        return self.output_logits(hidden)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of final hidden states ``[B, T, hidden]``."""
        return self.transformer.output_layer(hidden)

    def hidden_states(self, input_ids=None, position_ids=None, attention_mask=None, cache_positions=None,
                      inputs_embeds=None, cache_rows=None) -> torch.Tensor:
        return run_stages(self.hidden_state_stages(input_ids, position_ids, attention_mask, cache_positions,
                                                   inputs_embeds, cache_rows))

    def hidden_state_stages(self, input_ids=None, position_ids=None, attention_mask=None, cache_positions=None,
                            inputs_embeds=None, cache_rows=None, token_chunk: int | None = None) -> Iterator[float]:
        """``hidden_states`` one layer at a time, or pieces of layers with ``token_chunk`` (see
        ChatGLMForCausalLM.hidden_state_stages)."""
        layer_pass = self.start_pass(input_ids, position_ids, attention_mask, cache_positions, inputs_embeds,
                                     cache_rows)
        x, (rope, bias, cache_positions, kv_length, causal, cache_rows) = layer_pass.x, layer_pass.args
        length = x.shape[1]
        chunked = token_chunk is not None and token_chunk < length
        if chunked and (cache_positions is None or bias is None):
            raise ValueError("token_chunk needs a KV cache (cache_positions) and an attention_mask")
        for done, block in enumerate(self.transformer.encoder.layers):
            if not chunked:
                x = block(x, rope, bias, cache_positions, kv_length, causal, cache_rows)
                yield done + 1
                continue

            def write_keys(start: int, end: int, x=x, block=block) -> torch.Tensor:
                return block.write_keys(x[:, start:end], rope[:, start:end], cache_positions[..., start:end],
                                        cache_rows)

            def finish(start: int, end: int, queries: torch.Tensor, x=x, block=block) -> torch.Tensor:
                return block.finish(x[:, start:end], queries, bias[:, :, start:end], kv_length, cache_rows)

            x = yield from chunked_layer(length, token_chunk, write_keys, finish, done)
        return self.final_norm(x)

    def start_pass(self, input_ids=None, position_ids=None, attention_mask=None, cache_positions=None,
                   inputs_embeds=None, cache_rows=None) -> LayerPass:
        """A forward standing before block 0 (see ChatGLMForCausalLM.start_pass)."""
        x = embeddings_of(self.embed, input_ids, inputs_embeds)
        length = x.shape[1]
        if position_ids is None:
            if cache_positions is not None or input_ids is None:
                raise ValueError("position_ids are required with a KV cache or inputs_embeds")
            position_ids, attention_mask = glm4_prompt_inputs(input_ids, self.config)
        # Without an explicit mask a prompt is plainly causal and a decode step sees every written slot.
        causal = attention_mask is None and length > 1
        kv_length, bias = attention_span(attention_mask, cache_positions, length, x.dtype)
        rope = glm4_rope_table(position_ids[:, 0], self.config.kv_channels // 2, 10000.0 * self.config.rope_ratio,
                               x.dtype)
        return LayerPass(x, (rope, bias, cache_positions, kv_length, causal, cache_rows))

    def decoder_blocks(self) -> nn.ModuleList:
        return self.transformer.encoder.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transformer.encoder.final_layernorm(hidden)


def glm4_prompt_inputs(input_ids: torch.Tensor, config: GLM4TextConfig, num_pad: Sequence[int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[B, 1, T]`` and a causal mask ``[B, 1, T, T]`` (True = may attend) of left-padded prompts.

    Positions count tokens from 0 after the padding, except that the image vectors between
    ``<|begin_of_image|>`` and ``<|end_of_image|>`` all share the position after ``<|begin_of_image|>``,
    as the reference expands them (so an image costs three positions however many vectors it has).
    """
    batch, length = input_ids.shape
    pads = [0] * batch if num_pad is None else [int(p) for p in num_pad]
    ids = input_ids.cpu()
    inside = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        boi = (ids[row] == config.boi_token_id).nonzero().flatten().tolist()
        eoi = (ids[row] == config.eoi_token_id).nonzero().flatten().tolist()
        for start, end in zip(boi, eoi, strict=False):
            inside[row, start + 2:end] = True  # the first image vector advances, the others repeat it
    advance = (~inside).long()
    positions = torch.zeros(batch, 1, length, dtype=torch.long)
    allowed = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    for row, pad in enumerate(pads):
        positions[row, 0, pad:] = advance[row, pad:].cumsum(0) - 1
        allowed[row, 0, pad:, pad:] = causal[: length - pad, : length - pad]
    return positions.to(input_ids.device), allowed.to(input_ids.device)
