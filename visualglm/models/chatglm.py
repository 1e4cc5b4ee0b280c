"""ChatGLM-6B (first generation) decoder, numerically faithful to THUDM's reference code.

What makes it ChatGLM-6B rather than a generic GPT:
- post-LN blocks whose residual branch is the *normalised* input scaled by alpha = sqrt(56) (see
  RESIDUAL_ALPHA);
- 2D rotary encoding: the first half of each head is rotated by the token position, the second half by
  the block position (0 inside the prompt, 1, 2, ... from ``<sop>`` on), with the reference's
  float16-rounded inverse frequencies;
- a prefix-LM mask: everything before ``<sop>`` (the prompt, ``[gMASK]`` included) is visible to every
  token; from ``<sop>`` on attention is causal;
- the fused QKV projection is laid out per head: ``[q_h | k_h | v_h]`` for each head h.

Positions and the KV cache slots are explicit inputs; ``chatglm_prompt_inputs`` derives them from prompt
ids exactly like the reference tokenizer/model do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.config import ChatGLMConfig
from visualglm.models.kv_cache import CachedAttentionModel, KVCache
from visualglm.models.layers import (
    LayerPass,
    apply_rotary_halves,
    attention,
    attention_span,
    chunked_layer,
    common_prefix_length,
    embeddings_of,
    flatten_groups,
    last_positions,
    rotary_cos_sin,
    rotary_inv_freq,
    run_stages,
    unflatten_groups,
)


class ChatGLMAttention(nn.Module):
    """Multi-head self-attention with the fused, per-head-interleaved QKV projection."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.kv_cache: KVCache | None = None
        # Optional extra keys/values every query attends to, e.g. P-tuning v2 prefixes: a callable
        # ``batch_size -> (k, v)``, each ``[B, heads, P, head_dim]``, neither rotated nor cached.
        self.extra_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.single_query = "matmul"  # the CPU decode-step kernel (see layers.SINGLE_QUERY_KERNELS), set at load

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
                cache_positions: torch.Tensor | None, kv_length: int,
                cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, T, hidden]``; cos/sin ``[B, T, 1, head_dim]``; bias ``[B, 1, T, kv_length]`` or None.

        With a cache the new keys/values go to slots ``cache_positions`` (``[T]``, or ``[B, T]`` per row) of
        cache rows ``cache_rows`` (see ``KVCache.update``) and the queries attend to slots
        ``[0, kv_length)``; without one they attend to the T tokens themselves. ``extra_kv`` keys and
        values, when set, are placed before those and visible to every query.
        """
        return self.dense(self.mix(self.query_key_value(x), cos, sin, bias, cache_positions, kv_length, cache_rows))

    def mix(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
            cache_positions: torch.Tensor | None, kv_length: int,
            cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` between its two linear layers: the heads ``[B, T, hidden]`` (before ``dense``) of the
        fused projection ``qkv`` ``[B, T, 3 * hidden]``; the other arguments as in ``forward``."""
        q, k, v = self.split_heads(qkv, cos, sin)
        if cache_positions is not None:
            if self.kv_cache is None:
                raise RuntimeError("cache_positions given but no KV cache: call setup_kv_cache() first")
            k, v = self.kv_cache.update(cache_positions, k, v, kv_length, cache_rows)
        return self.heads_output(q, k, v, bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys and the values of x ``[B, T, hidden]``: each ``[B, heads, T, head_dim]``."""
        return self.split_heads(self.query_key_value(x), cos, sin)

    def split_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``project`` after the linear layer: qkv ``[B, T, 3 * hidden]`` cut per head and rotated."""
        batch, length, _ = qkv.shape
        q, k, v = qkv.view(batch, length, self.num_heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        q = apply_rotary_halves(q, cos, sin, chunks=2).transpose(1, 2)
        k = apply_rotary_halves(k, cos, sin, chunks=2).transpose(1, 2)
        return q, k, v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The output ``[B, T, hidden]`` of queries ``[B, heads, T, head_dim]`` over keys/values
        ``[B, heads, S, head_dim]`` (``extra_kv`` placed before them), bias ``[B, 1, T, S]`` or None."""
        return self.dense(self.heads_output(q, k, v, bias))

    def heads_output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """``attend`` before ``dense``: the heads' outputs side by side, ``[B, T, hidden]``."""
        batch, _, length, _ = q.shape
        if self.extra_kv is not None:
            extra_k, extra_v = self.extra_kv(batch)
            k = torch.cat((extra_k.to(k.dtype), k), dim=2)
            v = torch.cat((extra_v.to(v.dtype), v), dim=2)
            if bias is not None:
                bias = F.pad(bias, (extra_k.shape[2], 0))  # 0 = visible
        out = attention(q, k, v, bias, self.single_query)  # [B, H, T, D]
        return out.transpose(1, 2).reshape(batch, length, -1)


class ChatGLMMLP(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (the reference calls it GLU, but it has no gate)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


# DeepNorm residual scale. The reference computes sqrt(2 * num_layers) with GLMBlock's default
# num_layers=28, which its model never overrides: alpha is sqrt(56) for every config (checked against the
# golden 2-layer model, whose logits match only with this constant).
RESIDUAL_ALPHA = math.sqrt(2 * 28)


class GLMBlock(nn.Module):
    """Post-LN block: ``y = alpha * LN1(x) + Attn(LN1(x))``; ``out = alpha * LN2(y) + MLP(LN2(y))``."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.alpha = RESIDUAL_ALPHA
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
                cache_positions: torch.Tensor | None, kv_length: int,
                cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        attn_in = self.input_layernorm(x)
        x = attn_in * self.alpha + self.attention(attn_in, cos, sin, bias, cache_positions, kv_length, cache_rows)
        mlp_in = self.post_attention_layernorm(x)
        return mlp_in * self.alpha + self.mlp(mlp_in)

    def forward_joint(self, parts: Sequence[tuple[torch.Tensor, tuple]]) -> list[torch.Tensor]:
        """``forward`` for several groups of tokens, each ``(x [B_i, T_i, hidden], the rest of forward's
        arguments)``: everything but attention (the norms, the linear layers, the residuals) runs once on
        every group's tokens as one matrix (``layers.flatten_groups``), so each weight is read once;
        attention group by group. The outputs ``[B_i, T_i, hidden]``, in order. Several groups bypass the
        attention module's own call (and so its hooks: tensor parallelism's reduction runs one group at a
        time)."""
        if len(parts) == 1:
            return [self(parts[0][0], *parts[0][1])]
        flat, shapes = flatten_groups([x for x, _ in parts])
        attn_in = self.input_layernorm(flat)
        qkv = unflatten_groups(self.attention.query_key_value(attn_in), shapes)
        heads = [self.attention.mix(qkv_i, *args) for qkv_i, (_, args) in zip(qkv, parts, strict=True)]
        x = attn_in * self.alpha + self.attention.dense(flatten_groups(heads)[0])
        mlp_in = self.post_attention_layernorm(x)
        return unflatten_groups(mlp_in * self.alpha + self.mlp(mlp_in), shapes)

    def write_keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_positions: torch.Tensor,
                   cache_rows: slice | torch.Tensor | None) -> torch.Tensor:
        """The first half of ``forward`` for some of a prompt's tokens (x ``[B, t, hidden]``): write their
        keys/values to the cache, return their queries ``[B, heads, t, head_dim]`` (see ``chunked_layer``)."""
        q, k, v = self.attention.project(self.input_layernorm(x), cos, sin)
        self.attention.kv_cache.write(cache_positions, k, v, cache_rows)
        return q

    def finish(self, x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, kv_length: int,
               cache_rows: slice | torch.Tensor | None) -> torch.Tensor:
        """The rest of ``forward`` for the tokens ``write_keys`` took (their queries ``q``), attending to
        cache slots ``[0, kv_length)``: the block's output ``[B, t, hidden]``."""
        attn_in = self.input_layernorm(x)
        k, v = self.attention.kv_cache.read(kv_length, cache_rows)
        x = attn_in * self.alpha + self.attention.attend(q, k, v, bias)
        mlp_in = self.post_attention_layernorm(x)
        return mlp_in * self.alpha + self.mlp(mlp_in)


class ChatGLMTransformer(nn.Module):
    """Embedding, the stack of blocks and the final LayerNorm (checkpoint prefix ``transformer.``)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLMForCausalLM(CachedAttentionModel, nn.Module):
    """ChatGLM-6B with its LM head. Module names equal the official checkpoint's key names."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        if not config.position_encoding_2d:
            raise NotImplementedError("position_encoding_2d=false is not supported: every released "
                                      "ChatGLM-6B checkpoint uses the 2D rotary encoding")
        self.config = config
        self.transformer = ChatGLMTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    # Checkpoint keys that are aliases of another parameter when embeddings are tied.
    def tied_parameters(self) -> dict[str, str]:
        """``{alias: source}`` parameter names that share storage (empty when untied)."""
        if self.config.tie_word_embeddings:
            return {"lm_head.weight": "transformer.word_embeddings.weight"}
        return {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    # --- KV cache (see CachedAttentionModel) -------------------------------------------------------
    def attention_modules(self) -> list[nn.Module]:
        return [block.attention for block in self.transformer.layers]

    def kv_cache_layout(self) -> tuple[int, int]:
        return self.config.num_attention_heads, self.config.head_dim

    # --- positions (the generation engine is model-agnostic and asks the model) ---------------------------
    def prompt_inputs(self, input_ids: torch.Tensor, num_pad: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids ``[B, 2, T]`` and mask ``[B, 1, T, T]`` of left-padded prompts (see below)."""
        return chatglm_prompt_inputs(input_ids, self.config, num_pad)

    @staticmethod
    def next_position_ids(last: torch.Tensor) -> torch.Tensor:
        """Positions ``[B, 2, 1]`` of the token after one at ``last`` ``[B, 2, 1]``: the token position
        stays at ``[gMASK]``, the block position advances by one."""
        return last + torch.tensor([0, 1], dtype=last.dtype, device=last.device).view(1, 2, 1)

    def reusable_prefix(self, cached_ids: Sequence[int], new_ids: Sequence[int]) -> int:
        """How many leading cache slots computed for ``cached_ids`` stay exact for ``new_ids``.

        Tokens before ``<sop>`` attend to the whole context in both directions, so their keys/values
        (from layer 1 on) depend on every context token: the cache is reusable only when the context
        (everything up to ``<sop>``) is identical, and then up to the common prefix. At least one token is
        always left to prefill, because its logits are needed.
        """
        bos = self.config.bos_token_id
        if bos not in cached_ids or bos not in new_ids:
            return 0
        context = list(new_ids).index(bos)
        if list(cached_ids).index(bos) != context:
            return 0
        common = common_prefix_length(cached_ids, new_ids)
        if common <= context:
            return 0
        return min(common, len(new_ids) - 1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    # --- forward --------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, T, hidden]`` for ids ``[B, T]``."""
        return self.transformer.word_embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, logits_to_keep: int = 0,
                cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T', vocab]`` (T' = T, or the last ``logits_to_keep`` positions when > 0).

        input_ids ``[B, T]`` or inputs_embeds ``[B, T, hidden]``; position_ids ``[B, 2, T]``;
        attention_mask bool ``[B, 1, T, S]`` with True = may attend, where S = T without a cache and the
        number of cache slots to attend to with one; cache_positions ``[T]`` = the slots the new keys and
        values are written to (``[B, T]``: per row), in cache rows ``cache_rows`` (None: all; a slice or
        indices ``[B]``). Without a cache, positions and mask may be omitted: they are then derived from
        ``input_ids`` as for a prompt. With a cache and no mask (a decode step without padding), the
        queries see every slot up to the last written one.
        """
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, cache_positions, inputs_embeds,
                                    cache_rows)
        if logits_to_keep > 0:
            hidden = last_positions(hidden, logits_to_keep)
        return self.output_logits(hidden)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of final hidden states ``[B, T, hidden]``."""
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None,
                      cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm output ``[B, T, hidden]``; arguments as in ``forward``."""
        return run_stages(self.hidden_state_stages(input_ids, position_ids, attention_mask, cache_positions,
                                                   inputs_embeds, cache_rows))

    def hidden_state_stages(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                            inputs_embeds: torch.Tensor | None = None,
                            cache_rows: slice | torch.Tensor | None = None,
                            token_chunk: int | None = None) -> Iterator[float]:
        """``hidden_states`` one layer at a time: a generator that yields the number of layers done after
        each one and returns the final hidden states. A long prompt's prefill can so be spread over several
        engine steps, with other rows' decode steps in between, exactly (see ``run_stages``). With
        ``token_chunk`` (and a KV cache) a prompt longer than that is cut inside each layer too, into pieces
        of that many tokens (see ``chunked_layer``; the yields are then fractions of layers)."""
        layer_pass = self.start_pass(input_ids, position_ids, attention_mask, cache_positions, inputs_embeds,
                                     cache_rows)
        x, (cos, sin, bias, cache_positions, kv_length, cache_rows) = layer_pass.x, layer_pass.args
        length = x.shape[1]
        chunked = token_chunk is not None and token_chunk < length
        if chunked and cache_positions is None:
            raise ValueError("token_chunk needs a KV cache (cache_positions)")
        for done, block in enumerate(self.transformer.layers):
            if not chunked:
                x = block(x, cos, sin, bias, cache_positions, kv_length, cache_rows)
                yield done + 1
                continue

            def write_keys(start: int, end: int, x=x, block=block) -> torch.Tensor:
                return block.write_keys(x[:, start:end], cos[:, start:end], sin[:, start:end],
                                        cache_positions[..., start:end], cache_rows)

            def finish(start: int, end: int, queries: torch.Tensor, x=x, block=block) -> torch.Tensor:
                return block.finish(x[:, start:end], queries, None if bias is None else bias[:, :, start:end],
                                    kv_length, cache_rows)

            x = yield from chunked_layer(length, token_chunk, write_keys, finish, done)
        return self.final_norm(x)

    def start_pass(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None,
                   cache_rows: slice | torch.Tensor | None = None) -> LayerPass:
        """A forward (arguments as in ``forward``) standing before block 0: the embeddings and the attention
        arguments every block takes. Run it with ``layers.advance_passes`` over ``decoder_blocks()``, then
        ``final_norm``."""
        x = embeddings_of(self.embed, input_ids, inputs_embeds)
        length = x.shape[1]
        if position_ids is None or (attention_mask is None and cache_positions is None):
            if cache_positions is not None or input_ids is None:
                raise ValueError("position_ids (and a mask for prompts) are required with a KV cache "
                                 "or inputs_embeds")
            derived_positions, derived_mask = chatglm_prompt_inputs(input_ids, self.config)
            position_ids = derived_positions if position_ids is None else position_ids
            attention_mask = derived_mask if attention_mask is None else attention_mask
        kv_length, bias = attention_span(attention_mask, cache_positions, length, x.dtype)

        inv_freq = rotary_inv_freq(self.config.head_dim // 2, device=x.device, round_to_fp16=True)
        cos, sin = rotary_cos_sin(position_ids, inv_freq, x.dtype)  # [B, 2, T, head_dim / 2]
        cos = torch.cat((cos[:, 0], cos[:, 1]), dim=-1).unsqueeze(2)  # [B, T, 1, head_dim]
        sin = torch.cat((sin[:, 0], sin[:, 1]), dim=-1).unsqueeze(2)
        return LayerPass(x, (cos, sin, bias, cache_positions, kv_length, cache_rows))

    def decoder_blocks(self) -> nn.ModuleList:
        """The blocks in order; each has ``forward_joint`` (see ``layers.advance_passes``)."""
        return self.transformer.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm of the last block's output ``[B, T, hidden]``."""
        return self.transformer.final_layernorm(hidden)


def chatglm_prompt_inputs(input_ids: torch.Tensor, config: ChatGLMConfig,
                          num_pad: Sequence[int] | torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids ``[B, 2, T]`` and the prefix-LM mask ``[B, 1, T, T]`` (True = may attend) of prompts.

    ``input_ids`` ``[B, T]`` are left-padded by ``num_pad[b]`` tokens (default: none). For each row the
    context is everything before ``<sop>``; ``mpos`` is the index of ``[gMASK]`` (or ``[MASK]``).
    Row 0 of the positions counts tokens and stays at ``mpos`` from ``<sop>`` on; row 1 is 0 in the
    context and 1, 2, ... from ``<sop>`` on. Padding gets position 0 and is blocked as key and as query.
    """
    batch, length = input_ids.shape
    pads = [0] * batch if num_pad is None else [int(p) for p in num_pad]
    positions = torch.zeros(batch, 2, length, dtype=torch.long)
    allowed = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    for row, (ids, pad) in enumerate(zip(input_ids.tolist(), pads, strict=True)):
        seq = ids[pad:]
        context = _index_of(seq, config.bos_token_id, "<sop> (bos)", row)
        if config.gmask_token_id in seq:
            mask_pos = seq.index(config.gmask_token_id)
        else:
            mask_pos = _index_of(seq, config.mask_token_id, "[gMASK] or [MASK]", row)
        n = len(seq)
        token_pos = torch.arange(n)
        token_pos[context:] = mask_pos
        block_pos = torch.zeros(n, dtype=torch.long)
        block_pos[context:] = torch.arange(1, n - context + 1)
        positions[row, 0, pad:] = token_pos
        positions[row, 1, pad:] = block_pos
        visible = causal[:n, :n].clone()
        visible[:, :context] = True
        allowed[row, 0, pad:, pad:] = visible
    return positions.to(input_ids.device), allowed.to(input_ids.device)


def _index_of(seq: list[int], token_id: int, what: str, row: int) -> int:
    try:
        return seq.index(token_id)
    except ValueError:
        raise ValueError(f"prompt row {row} has no {what} token (id {token_id}); ChatGLM prompts end with "
                         "[gMASK] <sop> - was the prompt truncated?") from None
