"""Per-model plans kept as data: which modules stay in floating point when the model is quantized.

The references quantize only the language model's transformer linears: ChatGLM-6B keeps its embeddings
and ``lm_head``; VisualGLM-6B's README advises against quantizing the vision encoder (its error is
large); GLM-4V-9B's vision tower and output layer stay too. Patterns are fnmatch on module names.
"""

from __future__ import annotations

QUANT_SKIP: dict[str, tuple[str, ...]] = {
    "chatglm": ("lm_head",),
    "visualglm": ("lm_head", "image_encoder.*"),
    "glm4v": ("transformer.output_layer", "transformer.vision.*"),
}
