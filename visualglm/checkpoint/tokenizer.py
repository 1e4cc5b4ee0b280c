"""Pick and load the tokenizer that belongs to a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.config import FAMILY_NAMES, ConfigError, detect_family
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.glm4 import GLM4Tokenizer


def load_tokenizer(path_or_name: str | Path) -> ChatGLMTokenizer | GLM4Tokenizer:
    """The tokenizer of a checkpoint directory, a known model name or a hub id."""
    import json

    directory = resolve_checkpoint_dir(path_or_name)
    config_file = directory / "config.json"
    family = "chatglm"
    if config_file.is_file():
        try:
            family = detect_family(json.loads(config_file.read_text(encoding="utf-8")))
        except ValueError as exc:  # JSONDecodeError and ConfigError
            raise ConfigError(f"{config_file}: {exc}") from None
    if family in ("chatglm", "visualglm"):
        return ChatGLMTokenizer.from_pretrained(directory)
    if family == "glm4v":
        return GLM4Tokenizer.from_pretrained(directory)
    raise ConfigError(f"no tokenizer for {FAMILY_NAMES[family]} checkpoints yet")
