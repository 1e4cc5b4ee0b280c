"""VisualGLM: exact, fast PyTorch runtime for ChatGLM-6B, VisualGLM-6B and GLM-4V-9B.

Public API::

    import visualglm
    model = visualglm.load("path/to/chatglm-6b", dtype="bfloat16")
    tokenizer = visualglm.load_tokenizer("path/to/chatglm-6b")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "load_tokenizer", "__version__"]

if TYPE_CHECKING:
    from torch import nn


def load(path_or_name: str, **kwargs: Any) -> nn.Module:
    """Load a model; see ``visualglm.checkpoint.load.load`` for the arguments."""
    from visualglm.checkpoint.load import load as _load

    return _load(path_or_name, **kwargs)


def load_tokenizer(path_or_name: str) -> Any:
    """Load the tokenizer stored in a checkpoint directory (or a known name / hub id)."""
    from visualglm.checkpoint.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path_or_name)
