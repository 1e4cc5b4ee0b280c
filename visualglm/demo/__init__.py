"""The shipped demo model: a tiny VisualGLM-6B-architecture model trained on easy-VQA by this package.

``DEMO_MODEL_DIR`` holds it in the official HF layout (config.json, model.safetensors, ice_text.model,
tokenizer_config.json), so ``visualglm.load`` reads it like any real checkpoint. Commands that take
``--model`` use it when none is given (:func:`resolve_model`).
"""

from __future__ import annotations

from pathlib import Path

from visualglm.config import VisualGLMConfig

DEMO_FAMILY = VisualGLMConfig.family  # the demo model's architecture (visualglm.demo.recipe.demo_config)
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_MODEL_NAME = "visualglm-demo"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"  # images drawn in easy-VQA's style


def default_model_dir() -> Path:
    """The shipped demo checkpoint directory; a clear error when the installation lacks it."""
    if not (DEMO_MODEL_DIR / "config.json").is_file() or not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shipped demo model is missing from {DEMO_MODEL_DIR} (reinstall the package, "
                                "or retrain it with `visualglm demo train`), or pass --model")
    return DEMO_MODEL_DIR


def resolve_model(model: str | Path | None) -> str | Path:
    """``model`` as given, or the shipped demo model when it is None/empty (or the name ``visualglm-demo``)."""
    if not model or str(model) == DEMO_MODEL_NAME:
        return default_model_dir()
    return model
