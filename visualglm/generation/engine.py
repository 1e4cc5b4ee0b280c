"""Prefill + decode on the model's static KV cache, yielding one token per row per step.

The engine knows nothing of a model family: the model supplies ``prompt_inputs`` (positions and mask of
left-padded prompts) and ``next_position_ids`` (how positions advance while decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# (logits [B, vocab] float32, tokens so far [B, T]) -> token ids [B]
TokenChooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def greedy(logits: torch.Tensor, _tokens: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@dataclass
class Step:
    """One decoding step: the chosen ``tokens`` ``[B]`` and the ``logits`` ``[B, vocab]`` they came from."""

    tokens: torch.Tensor
    logits: torch.Tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Prompts -> ids ``[B, T]`` padded on the left with ``pad_id``, and the pad count of each row."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    num_pad = [length - len(p) for p in prompts]
    rows = [[pad_id] * n + list(p) for p, n in zip(prompts, num_pad, strict=True)]
    return torch.tensor(rows, dtype=torch.long), num_pad


@torch.inference_mode()
def generate_steps(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   choose: TokenChooser = greedy, pad_id: int | None = None) -> Iterator[Step]:
    """Yield ``max_new_tokens`` steps for a batch of prompts (no stopping rule: callers decide).

    The cache is sized to the prompt plus ``max_new_tokens``. Each decode step attends through the last
    prompt row of the mask extended by the generated tokens, which keeps left padding blocked.
    """
    config = model.config
    pad_id = config.pad_token_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    input_ids, num_pad = left_pad(prompts, pad_id)
    input_ids = input_ids.to(device)
    batch, length = input_ids.shape
    positions, mask = model.prompt_inputs(input_ids, num_pad)
    model.setup_kv_cache(batch, length + max_new_tokens)
    logits = model(input_ids, positions, mask, cache_positions=torch.arange(length, device=device),
                   logits_to_keep=1)[:, -1].float()
    tokens = input_ids
    # Without padding the last prompt row sees every slot, so decode steps need no mask at all.
    row_mask = mask[:, :, -1:, :] if any(num_pad) else None
    position = positions[..., -1:]
    for step in range(max_new_tokens):
        next_tokens = choose(logits, tokens)
        yield Step(next_tokens, logits)
        if step == max_new_tokens - 1:
            break
        tokens = torch.cat((tokens, next_tokens[:, None]), dim=1)
        position = model.next_position_ids(position)
        if row_mask is not None:
            row_mask = torch.cat((row_mask, row_mask.new_ones(batch, 1, 1, 1)), dim=-1)
        slot = torch.tensor([length + step], device=device)
        logits = model(next_tokens[:, None], position, row_mask, cache_positions=slot)[:, -1].float()
    model.delete_kv_cache()
