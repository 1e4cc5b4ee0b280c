"""Pick and load the tokenizer that belongs to a checkpoint directory (the family's ``tokenizer_class``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.config import FAMILY_NAMES, ChatGLMConfig, ConfigError, detect_family
from visualglm.families import FAMILIES

# A directory without config.json is read as ChatGLM-6B's tokenizer files (``ice_text.model``), as before
# GLM-4V-9B existed.
_FAMILY_WITHOUT_CONFIG = ChatGLMConfig.family


def load_tokenizer(path_or_name: str | Path) -> Any:
    """The tokenizer of a checkpoint directory, a known model name or a hub id: an instance of its family's
    ``FamilySpec.tokenizer_class``. ConfigError for a family recognised but without a tokenizer yet."""
    directory = resolve_checkpoint_dir(path_or_name)
    family = _family_of(directory)
    spec = FAMILIES.get(family)
    if spec is None:
        raise ConfigError(f"no tokenizer for {FAMILY_NAMES[family]} checkpoints yet")
    return spec.tokenizer_class.from_pretrained(directory)


def _family_of(directory: Path) -> str:
    config_file = directory / "config.json"
    if not config_file.is_file():
        return _FAMILY_WITHOUT_CONFIG
    try:
        return detect_family(json.loads(config_file.read_text(encoding="utf-8")))
    except ValueError as exc:  # JSONDecodeError and ConfigError
        raise ConfigError(f"{config_file}: {exc}") from None
