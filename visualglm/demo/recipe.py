"""What the shipped demo model is: its tokenizer corpus, its config and its training hyperparameters.

Everything here is fixed (seeded), so ``visualglm demo train`` rebuilds the same model on the same machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from visualglm.config import EvaViTConfig, QFormerConfig, VisualGLMConfig
from visualglm.demo.data import Record, corpus_lines
from visualglm.demo.translate import DESCRIBE_EN, DESCRIBE_ZH
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.tiny import train_chatglm_sentencepiece

IMAGE_SIZE = 64  # easy-VQA's own size: no resampling of the training images
IMAGE_LENGTH = 8  # Q-Former queries = image tokens in the prompt (VisualGLM-6B has 32)


@dataclass(frozen=True)
class TrainRecipe:
    """Hyperparameters of ``visualglm demo train`` (defaults are the shipped model's)."""

    seed: int = 0
    # Stage 1: the vision tower alone learns colour and shape through a temporary linear head on its
    # mean-pooled tokens (the role a pretrained EVA-CLIP plays for VisualGLM-6B). Trained end to end from
    # scratch, answer tokens teach it colours quickly but not shapes (chance after 1,200 steps).
    vision_steps: int = 1000
    vision_learning_rate: float = 2e-3
    # Stage 2: the Q-Former, projection and language model on the questions (the vision tower frozen).
    steps: int = 2000
    freeze_vision: bool = True
    images_per_step: int = 64  # each image is encoded once per step ...
    questions_per_image: int = 2  # ... and asked this many of its (English or Chinese) questions
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Curriculum: the first ``focus_steps`` steps ask only questions whose answer names what is in the image
    # (colour, shape, description). Yes/no answers are mostly guessable from the question alone, so they
    # teach the vision tower little until it already tells colours and shapes apart.
    focus_steps: int = 0
    max_shift: int = 64  # random translation of each image (px), kept so the shape stays whole
    vocab_size: int = 700  # SentencePiece target (byte fallback pieces included)
    threads: int = 0  # torch threads; 0 = torch's default


def demo_config(tokenizer: ChatGLMTokenizer) -> VisualGLMConfig:
    """The demo model's config: VisualGLM-6B's architecture, small, with the tokenizer's special ids."""
    eva = EvaViTConfig(num_layers=4, hidden_size=128, num_attention_heads=4, inner_hidden_size=512,
                       image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=8,
                       max_sequence_length=1 + (IMAGE_SIZE // 8) ** 2)
    qformer = QFormerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, inner_hidden_size=512,
                            vocab_size=IMAGE_LENGTH, is_decoder=[True, True], cross_attn_hidden_size=128)
    config = VisualGLMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, num_layers=4, num_attention_heads=4,
        inner_hidden_size=512, max_sequence_length=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
        image_length=IMAGE_LENGTH, eva_config=eva, qformer_config=qformer)
    config.validate()
    return dataclasses.replace(config, extra={"architectures": ["ChatGLMModel"], "model_name": "visualglm-demo"})


def train_tokenizer(directory: str | Path, records: list[Record], vocab_size: int) -> Path:
    """SentencePiece vocabulary of the demo (ChatGLM-6B piece conventions) trained on the data's text and
    the prompt templates; returns the ``ice_text.model`` path."""
    template_lines = ["<img></img>Q:\nA:", "<img></img>问：\n答：", DESCRIBE_EN, DESCRIBE_ZH]
    lines = corpus_lines(records) + template_lines
    lines += [line[:1].upper() + line[1:] for line in lines if line[:1].islower()]  # "What ...", "Blue"
    return train_chatglm_sentencepiece(directory, lines, vocab_size=vocab_size)
