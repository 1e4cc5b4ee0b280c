"""Tiny random checkpoints of the three families with their own tokenizers, for offline demos, tests and
benchmarks."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from visualglm.checkpoint.io import build_model
from visualglm.checkpoint.save import save_checkpoint
from visualglm.config import ChatGLMConfig, GLM4VConfig, get_config
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.glm4 import GLM4Tokenizer
from visualglm.tokenizers.tiny import train_chatglm_sentencepiece, write_glm4_ranks


def init_random_weights(model: torch.nn.Module, weight_scale: float = 2.0, seed: int = 0,
                        layernorm_std: float = 0.3, bias_std: float = 0.05) -> torch.nn.Module:
    """Fill a built model in place: LayerNorm weights N(1, layernorm_std), biases N(0, bias_std), matrices
    N(0, weight_scale / sqrt(fan_in)). Deterministic for a seed; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                mean, std = 1.0, layernorm_std
            elif name.endswith("bias"):
                mean, std = 0.0, bias_std
            else:
                mean, std = 0.0, weight_scale / param.shape[-1] ** 0.5
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.copy_(noise.mul_(std).add_(mean))
    return model


def write_tiny_random_checkpoint(directory: str | Path, seed: int = 0, weight_scale: float = 2.0,
                                 family: str = ChatGLMConfig.family, **sizes: int) -> Path:
    """Write config.json + model.safetensors + the tokenizer file (official layout) to ``directory``.

    ``family`` "chatglm", "visualglm" (adds a tiny EVA ViT + Q-Former at 224 px), both with ice_text.model,
    or "glm4v" (see ``write_tiny_random_glm4v``). The config's special ids are the tokenizer's, as in the
    real checkpoint. Weights are random with ``weight_scale / sqrt(fan_in)`` std so that the network's
    output depends visibly on its input.
    ``sizes`` override the tiny config's language-model sizes (``hidden_size``, ``num_layers``, ...), e.g.
    for a mid-size model whose compute per step matters in a benchmark.
    """
    directory = Path(directory)
    if family == GLM4VConfig.family:
        return write_tiny_random_glm4v(directory, seed, weight_scale, **sizes)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = train_chatglm_sentencepiece(Path(tmp))
        vocab = ChatGLMTokenizer(vocab_file)
        config = dataclasses.replace(
            get_config(f"{family}-tiny"), vocab_size=vocab.vocab_size, bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id, mask_token_id=vocab.mask_token_id,
            gmask_token_id=vocab.gmask_token_id, pad_token_id=vocab.pad_token_id, extra={},
            # Untied: with random tied weights the residual stream makes the model echo its last input
            # token (<sop>, a control piece that decodes to nothing) forever.
            tie_word_embeddings=False, **sizes)
        return _save_random(config, directory, seed, weight_scale, {"ice_text.model": vocab_file.read_bytes()})


def write_tiny_random_glm4v(directory: str | Path, seed: int = 0, weight_scale: float = 2.0, **sizes: int) -> Path:
    """Write config.json + model.safetensors + tokenizer.model (GLM-4V-9B's layout) to ``directory``: the
    ``glm-4v-tiny`` config with ``sizes`` over it, a small byte-level vocabulary (``write_glm4_ranks``) whose
    14 special tokens follow its last rank, and the config's special ids (EOS, pad, image markers) set to
    them, as in the real checkpoint."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        ranks = write_glm4_ranks(tmp).read_bytes()
        tokenizer = GLM4Tokenizer.from_pretrained(tmp)
    vocab = -(-tokenizer.vocab_size // 64) * 64  # the embedding table padded to a multiple of 64
    config = dataclasses.replace(
        get_config("glm-4v-tiny"), padded_vocab_size=vocab, vocab_size=vocab,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.user_token_id, tokenizer.observation_token_id],
        pad_token_id=tokenizer.eos_token_id, boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id, extra={}, **sizes)
    return _save_random(config, directory, seed, weight_scale, {"tokenizer.model": ranks})


def _save_random(config, directory: Path, seed: int, weight_scale: float, tokenizer_files: dict[str, bytes]) -> Path:
    """Build ``config``'s model with random weights, save it to ``directory`` with ``tokenizer_files``."""
    model = build_model(config, device="cpu")
    init_random_weights(model, weight_scale, seed)
    save_checkpoint(model, directory)
    for name, data in tokenizer_files.items():
        (directory / name).write_bytes(data)
    return directory
