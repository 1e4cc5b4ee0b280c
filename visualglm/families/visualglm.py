"""VisualGLM-6B (ChatGLM-6B + EVA ViT + BLIP-2 Q-Former): its key maps, plans and reference defaults."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from visualglm.config import VisualGLMConfig
from visualglm.families.chatglm import (
    CHATGLM_FORCED_ID,
    CHATGLM_HF,
    CHATGLM_LORA,
    CHATGLM_SAT,
    CHATGLM_TP,
    eos_stop_ids,
)
from visualglm.families.spec import FamilySpec, KeyMap
from visualglm.models.visualglm import VisualGLMForCausalLM
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.templates import has_cjk, visualglm_ids, visualglm_prompt

# THUDM/visualglm-6b, Hugging Face layout: ChatGLM-6B's keys plus the image encoder, whose module names we
# keep equal to the sat-derived key names.
_IMAGE_ENCODER_KEYS = [
    "image_encoder.vit.transformer.word_embeddings.weight",
    "image_encoder.vit.transformer.position_embeddings.weight",
    "image_encoder.vit.mixins.patch_embedding.proj.weight",
    "image_encoder.vit.mixins.patch_embedding.proj.bias",
    "image_encoder.vit.mixins.cls.ln_vision.weight",
    "image_encoder.vit.mixins.cls.ln_vision.bias",
    *(f"image_encoder.vit.transformer.layers.{{}}.{name}.{p}"
      for name in ("input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
                   "mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for p in ("weight", "bias")),
    "image_encoder.qformer.transformer.word_embeddings.weight",
    *(f"image_encoder.qformer.transformer.layers.{{}}.{name}.{p}"
      for name in ("input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
                   "cross_attention.query", "cross_attention.key_value", "cross_attention.dense",
                   "post_cross_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
      for p in ("weight", "bias")),
    "image_encoder.qformer.transformer.final_layernorm.weight",
    "image_encoder.qformer.transformer.final_layernorm.bias",
    "image_encoder.glm_proj.weight",
    "image_encoder.glm_proj.bias",
]
VISUALGLM_HF: KeyMap = {**CHATGLM_HF, **{key: key for key in _IMAGE_ENCODER_KEYS}}

# VisualGLM-6B in sat: the image encoder is the ``eva`` mixin's ``model`` (a BLIP2 module), so every
# ``image_encoder.`` key is stored under ``mixins.eva.model.`` (dev_visual's convert_sat_checkpoint.py).
_SAT_IMAGE_PREFIX = "mixins.eva.model."
VISUALGLM_SAT: KeyMap = {
    **CHATGLM_SAT,
    **{_SAT_IMAGE_PREFIX + key.removeprefix("image_encoder."): key for key in _IMAGE_ENCODER_KEYS},
}

# HF ``chat``: top_p 0.4, top_k 100, temperature 0.8, repetition_penalty 1.2, a NaN-only guard forcing id 5
# (reference-spec B7). sat's BaseStrategy is a different code path.
VISUALGLM_SAMPLING = {"temperature": 0.8, "top_p": 0.4, "top_k": 100, "repetition_penalty": 1.2,
                      "do_sample": True, "invalid_score_forced_id": CHATGLM_FORCED_ID,
                      "invalid_score_nan_only": True}

# ``--english`` in VisualGLM's cli_demo: ``invalid_slices=[slice(63823, 130000)]`` (mostly CJK pieces).
VISUALGLM_ENGLISH_BANNED_RANGES: tuple[tuple[int, int], ...] = ((63823, 130000),)


def visualglm_prompt_ids(model: nn.Module, tokenizer, query: str, history: Sequence[tuple[str, str]],
                         image: bool, english: bool | None) -> tuple[list[int], int | None]:
    """VisualGLM-6B ``chat()``'s prompt ids with ``image_length`` placeholders after ``<img>`` when
    ``image``; ``english`` None picks ``Q:/A:`` for a query without CJK characters (its web demo)."""
    image_length = model.config.image_length if image else None
    english = english if english is not None else not has_cjk(query)
    return visualglm_ids(tokenizer, query, history, image_length=image_length, english=english)


def visualglm_image_prompt(tokenizer, query: str, history: Sequence[tuple[str, str]], image_length: int
                           ) -> tuple[list[int], int]:
    """VisualGLM-6B's HF ``build_inputs_with_image``: the Chinese template (the HF code has no other) with
    ``image_length`` placeholders after ``<img>``, and where they start."""
    return visualglm_ids(tokenizer, query, history, image_length=image_length, english=False)


VISUALGLM = FamilySpec(
    name=VisualGLMConfig.family,
    display_name="VisualGLM-6B",
    chat_label="VisualGLM-6B",
    config_class=VisualGLMConfig,
    model_class=VisualGLMForCausalLM,
    tokenizer_class=ChatGLMTokenizer,
    keymaps={"hf": VISUALGLM_HF, "sat": VISUALGLM_SAT},
    # VisualGLM-6B's README advises against quantizing the vision encoder (its error is large).
    quant_skip=("lm_head", "image_encoder.*"),
    quant_optional={"vision": ("image_encoder.*",), "output": ()},
    vision_tower="image_encoder",
    tp_plan=CHATGLM_TP,  # the language model is ChatGLM-6B under the same names; the image encoder is replicated
    lora=CHATGLM_LORA,  # VisualGLM-6B's finetune script: r 10, alpha 1, attention qkv + dense
    sampling=VISUALGLM_SAMPLING,
    max_length=2048,
    build_prompt=visualglm_prompt_ids,
    stop_ids=eos_stop_ids,
    postprocess="full-width",
    example_per_turn=True,
    answer_encoding={"add_special_tokens": False},
    template_language=True,
    sat_model_class="VisualGLMModel",
    thudm_quantized=True,
    hf_chat="image_first",
    hf_prompt_text=visualglm_prompt,  # the Chinese template: the HF code has no other
    hf_image_prompt=visualglm_image_prompt,
    english_banned_ranges=VISUALGLM_ENGLISH_BANNED_RANGES,
)
