"""Source checkpoint key -> our parameter name, as data.

One dict per source format. ``{}`` stands for a layer index; ``None`` means the key is dropped on load
(for example ChatGLM's ``rotary_emb.inv_freq``, which the reference itself ignores and recomputes).
The inverse (ours -> source) is derived, so conversion back to a source layout cannot drift.
"""

from __future__ import annotations

import re

KeyMap = dict[str, str | None]

# THUDM/chatglm-6b, Hugging Face layout. Our module names equal the official ones, so apart from the
# dropped rotary buffer this map is the identity; it is still written out so that unknown keys are errors.
CHATGLM_HF: KeyMap = {
    "transformer.word_embeddings.weight": "transformer.word_embeddings.weight",
    "transformer.layers.{}.input_layernorm.weight": "transformer.layers.{}.input_layernorm.weight",
    "transformer.layers.{}.input_layernorm.bias": "transformer.layers.{}.input_layernorm.bias",
    "transformer.layers.{}.attention.query_key_value.weight": "transformer.layers.{}.attention.query_key_value.weight",
    "transformer.layers.{}.attention.query_key_value.bias": "transformer.layers.{}.attention.query_key_value.bias",
    "transformer.layers.{}.attention.dense.weight": "transformer.layers.{}.attention.dense.weight",
    "transformer.layers.{}.attention.dense.bias": "transformer.layers.{}.attention.dense.bias",
    "transformer.layers.{}.attention.rotary_emb.inv_freq": None,
    "transformer.layers.{}.post_attention_layernorm.weight": "transformer.layers.{}.post_attention_layernorm.weight",
    "transformer.layers.{}.post_attention_layernorm.bias": "transformer.layers.{}.post_attention_layernorm.bias",
    "transformer.layers.{}.mlp.dense_h_to_4h.weight": "transformer.layers.{}.mlp.dense_h_to_4h.weight",
    "transformer.layers.{}.mlp.dense_h_to_4h.bias": "transformer.layers.{}.mlp.dense_h_to_4h.bias",
    "transformer.layers.{}.mlp.dense_4h_to_h.weight": "transformer.layers.{}.mlp.dense_4h_to_h.weight",
    "transformer.layers.{}.mlp.dense_4h_to_h.bias": "transformer.layers.{}.mlp.dense_4h_to_h.bias",
    "transformer.final_layernorm.weight": "transformer.final_layernorm.weight",
    "transformer.final_layernorm.bias": "transformer.final_layernorm.bias",
    "lm_head.weight": "lm_head.weight",
}

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

# SwissArmyTransformer (sat) layout of ChatGLM-6B (``<iter>/mp_rank_XX_model_states.pt``, see
# ``visualglm.checkpoint.sat``). Same names as HF for the transformer; the LM head lives in the
# ``chatglm-final`` mixin, the rotary buffer in the ``chatglm-attn`` mixin (recomputed, so dropped), and
# older sat versions (0.4.1 included) keep BaseTransformer's unused learned position table (dropped too).
# Tensor *names* are all that differs here; the QKV row order and model-parallel pieces are handled by
# ``visualglm.checkpoint.sat``.
CHATGLM_SAT: KeyMap = {
    **{key: target for key, target in CHATGLM_HF.items()
       if key != "lm_head.weight" and not key.endswith("rotary_emb.inv_freq")},
    "transformer.position_embeddings.weight": None,
    "mixins.chatglm-attn.rotary_emb.inv_freq": None,
    "mixins.chatglm-final.lm_head.weight": "lm_head.weight",
}
# VisualGLM-6B in sat: the image encoder is the ``eva`` mixin's ``model`` (a BLIP2 module), so every
# ``image_encoder.`` key is stored under ``mixins.eva.model.`` (dev_visual's convert_sat_checkpoint.py).
_SAT_IMAGE_PREFIX = "mixins.eva.model."
VISUALGLM_SAT: KeyMap = {
    **CHATGLM_SAT,
    **{_SAT_IMAGE_PREFIX + key.removeprefix("image_encoder."): key for key in _IMAGE_ENCODER_KEYS},
}

# THUDM/glm-4v-9b, Hugging Face layout; module names equal the key names.
_GLM4V_KEYS = [
    "transformer.embedding.word_embeddings.weight",
    *(f"transformer.encoder.layers.{{}}.{name}" for name in (
        "input_layernorm.weight", "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
        "self_attention.dense.weight", "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight",
        "mlp.dense_4h_to_h.weight")),
    "transformer.encoder.final_layernorm.weight",
    "transformer.output_layer.weight",
    "transformer.vision.patch_embedding.proj.weight",
    "transformer.vision.patch_embedding.proj.bias",
    "transformer.vision.patch_embedding.cls_embedding",
    "transformer.vision.patch_embedding.position_embedding.weight",
    *(f"transformer.vision.transformer.layers.{{}}.{name}.{p}" for name in (
        "input_layernorm", "attention.query_key_value", "attention.dense", "mlp.fc1", "mlp.fc2",
        "post_attention_layernorm") for p in ("weight", "bias")),
    "transformer.vision.conv.weight",
    "transformer.vision.conv.bias",
    *(f"transformer.vision.linear_proj.{name}" for name in (
        "linear_proj.weight", "norm1.weight", "norm1.bias", "gate_proj.weight", "dense_h_to_4h.weight",
        "dense_4h_to_h.weight")),
    "transformer.vision.boi",
    "transformer.vision.eoi",
]
GLM4V_HF: KeyMap = {**{key: key for key in _GLM4V_KEYS}, "transformer.rotary_pos_emb.inv_freq": None}

# Keymaps by (family, source format).
KEYMAPS: dict[tuple[str, str], KeyMap] = {
    ("chatglm", "hf"): CHATGLM_HF, ("visualglm", "hf"): VISUALGLM_HF, ("glm4v", "hf"): GLM4V_HF,
    ("chatglm", "sat"): CHATGLM_SAT, ("visualglm", "sat"): VISUALGLM_SAT,
}

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class UnknownKeyError(KeyError):
    """A checkpoint key that the key map does not describe."""


def _template(key: str) -> tuple[str, str | None]:
    """``a.3.b`` -> (``a.{}.b``, ``"3"``); keys without a layer index come back unchanged."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".{}." + key[match.end():], match.group(1)


def map_key(key: str, keymap: KeyMap) -> str | None:
    """Our name for a source ``key`` (None when it is dropped); UnknownKeyError when not in the map."""
    template, index = _template(key)
    if template not in keymap:
        raise UnknownKeyError(key)
    target = keymap[template]
    if target is None or index is None:
        return target
    return target.replace("{}", index, 1)


def invert(keymap: KeyMap) -> KeyMap:
    """Our name -> source key (dropped keys have no inverse)."""
    inverse: KeyMap = {}
    for source, target in keymap.items():
        if target is not None:
            if target in inverse:
                raise ValueError(f"key map is not invertible: {target!r} has two sources")
            inverse[target] = source
    return inverse
