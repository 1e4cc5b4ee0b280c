"""The GLM-4 text decoder needs only the fields of ``GLM4TextConfig``: no vision config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visualglm.config import get_config
from visualglm.generation.engine import GenerationParams, generate_steps
from visualglm.models.glm4 import GLM4ForCausalLM, GLM4TextConfig


@dataclass(frozen=True)
class TextOnly:
    """The tiny GLM-4V config's decoder fields, nothing else."""

    padded_vocab_size: int = 1024
    hidden_size: int = 64
    ffn_hidden_size: int = 96
    num_layers: int = 2
    num_attention_heads: int = 4
    kv_heads: int = 2
    kv_channels: int = 16
    layernorm_epsilon: float = 1.5625e-07
    rope_ratio: float = 1.0
    boi_token_id: int = 1018
    eoi_token_id: int = 1019
    pad_token_id: int = 1008
    max_sequence_length: int = 8192


def test_glm4v_config_and_a_text_only_config_satisfy_the_protocol() -> None:
    assert isinstance(get_config("glm-4v-tiny"), GLM4TextConfig)
    assert isinstance(TextOnly(), GLM4TextConfig)
    assert not hasattr(TextOnly(), "vision_config")


def test_a_text_only_config_builds_the_same_decoder() -> None:
    torch.manual_seed(0)
    reference = GLM4ForCausalLM(get_config("glm-4v-tiny")).eval()
    text = GLM4ForCausalLM(TextOnly()).eval()
    text.load_state_dict(reference.state_dict())
    prompt = [[5, 6, 7, 8]]
    params = GenerationParams(max_new_tokens=4)
    want = [s.tokens.tolist() for s in generate_steps(reference, prompt, params=params)]
    got = [s.tokens.tolist() for s in generate_steps(text, prompt, params=params)]
    assert got == want and len(got) == 4
