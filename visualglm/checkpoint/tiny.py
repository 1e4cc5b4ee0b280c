"""A tiny random ChatGLM-6B-architecture checkpoint with its own tokenizer, for offline demos and tests."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from visualglm.checkpoint.load import build_model
from visualglm.checkpoint.save import save_checkpoint
from visualglm.config import get_config
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.tiny import train_chatglm_sentencepiece


def write_tiny_random_checkpoint(directory: str | Path, seed: int = 0, weight_scale: float = 2.0) -> Path:
    """Write config.json + model.safetensors + ice_text.model (official layout) to ``directory``.

    The config's special ids are the tokenizer's, as in the real checkpoint. Weights are random with
    ``weight_scale / sqrt(fan_in)`` std so that the network's output depends visibly on its input.
    """
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = train_chatglm_sentencepiece(Path(tmp))
        vocab = ChatGLMTokenizer(vocab_file)
        config = dataclasses.replace(
            get_config("chatglm-tiny"), vocab_size=vocab.vocab_size, bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id, mask_token_id=vocab.mask_token_id,
            gmask_token_id=vocab.gmask_token_id, pad_token_id=vocab.pad_token_id, extra={},
            # Untied: with random tied weights the residual stream makes the model echo its last input
            # token (<sop>, a control piece that decodes to nothing) forever.
            tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = build_model(config, device="cpu")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    param.normal_(1.0, 0.3)
                elif name.endswith("bias"):
                    param.normal_(0.0, 0.05)
                else:
                    param.normal_(0.0, weight_scale / param.shape[-1] ** 0.5)
        save_checkpoint(model, directory)
        (directory / "ice_text.model").write_bytes(vocab_file.read_bytes())
    return directory
