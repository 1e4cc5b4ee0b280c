"""The interfaces the rest of the package relies on: what a decoder and a multimodal model provide.

The generation engine, chat sessions, serving, fine-tuning and the loader talk to models only through these
methods. Every model class implements :class:`Decoder`; the ones with a vision tower also implement
:class:`MultimodalDecoder`. The protocols are ``runtime_checkable`` so that a capability is asked with
:func:`is_multimodal` (one ``isinstance``), never probed attribute by attribute.

Shapes: ``B`` rows, ``T`` tokens, ``hidden`` the decoder width, ``N`` image vectors per image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from visualglm.models.layers import LayerPass


@runtime_checkable
class Decoder(Protocol):
    """A causal-LM decoder with explicit positions and a preallocated KV cache (see ``kv_cache.py``)."""

    config: Any

    # --- positions and masks: the engine is model-agnostic and asks the model -------------------------
    def prompt_inputs(self, input_ids: torch.Tensor, num_pad: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and attention mask of left-padded prompts ``[B, T]`` (layouts: the model's)."""

    def next_position_ids(self, last: torch.Tensor) -> torch.Tensor:
        """Positions of the token after the one at ``last`` (same layout, length 1)."""

    def reusable_prefix(self, cached_ids: Sequence[int], new_ids: Sequence[int]) -> int:
        """How many leading cache slots computed for ``cached_ids`` stay exact for ``new_ids``."""

    # --- the KV cache ---------------------------------------------------------------------------------
    def attention_modules(self) -> list[nn.Module]:
        """The attention modules, in layer order; each has a ``kv_cache`` attribute."""

    def kv_cache_layout(self) -> tuple[int, int]:
        """(key/value heads, head dim) of one layer's cache."""

    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
        """Preallocate ``[batch_size, heads, max_length, head_dim]`` in every layer."""

    # --- embeddings, hidden states, logits ------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table ``[vocab, hidden]``."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, T, hidden]`` for ids ``[B, T]``."""

    def hidden_states(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None, cache_rows: Any = None) -> torch.Tensor:
        """Final hidden states ``[B, T, hidden]``."""

    def hidden_state_stages(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                            inputs_embeds: torch.Tensor | None = None, cache_rows: Any = None,
                            token_chunk: int | None = None) -> Iterator[float]:
        """The same computation cut between layers, and with ``token_chunk`` inside them: yields the layers
        done (a float) after each piece and returns the final hidden states."""

    def start_pass(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, cache_positions: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None, cache_rows: Any = None) -> LayerPass:
        """The same computation as a pass through the blocks that other passes may join at a block (see
        ``layers.advance_passes``): standing before block 0."""

    def decoder_blocks(self) -> nn.ModuleList:
        """The blocks in order, each with ``forward_joint``."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of the last block's output: ``hidden_states``' result."""

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of hidden states ``[B, T, hidden]``."""

    # --- parameters that share storage ----------------------------------------------------------------
    def tied_parameters(self) -> dict[str, str]:
        """``{alias: source}`` parameter names that share storage (empty when untied)."""

    def tie_weights(self) -> None:
        """Make every alias of ``tied_parameters`` the same tensor as its source again."""


@runtime_checkable
class MultimodalDecoder(Decoder, Protocol):
    """A decoder whose prompts may hold an image: its vision tower turns pixels into embeddings that replace
    a span of placeholder tokens."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values ``[B, 3, H, W]`` -> image embeddings ``[B, N, hidden]`` in the decoder's dtype."""

    def embed_with_images(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                          image_starts: Sequence[int | None]) -> torch.Tensor:
        """Token embeddings ``[B, T, hidden]`` with row b's span at ``image_starts[b]`` replaced by
        ``image_embeds[b]`` (see :func:`visualglm.models.layers.splice_image_embeddings`)."""


def is_multimodal(model: object) -> bool:
    """True when ``model`` takes images (implements :class:`MultimodalDecoder`)."""
    return isinstance(model, MultimodalDecoder)
