"""GLM-4V-9B (GLM-4 decoder + EVA2-CLIP-E): its key maps, plans and reference defaults."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from visualglm.config import GLM4VConfig
from visualglm.families.spec import FamilySpec, KeyMap
from visualglm.models.glm4v import GLM4VForCausalLM
from visualglm.models.plans import TensorParallelPlan, Unit
from visualglm.tokenizers.glm4 import GLM4Tokenizer
from visualglm.tokenizers.templates import glm4_messages

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


GLM4_TP = TensorParallelPlan(
    units={"heads": Unit("num_attention_heads", "kv_channels", "attention heads"),
           "kv_groups": Unit("kv_heads", "kv_channels", "key/value groups (multi_query_group_num)"),
           "ffn": Unit("ffn_hidden_size", 1, "MLP features (ffn_hidden_size)"),
           "vocab": Unit("padded_vocab_size", 1, "vocabulary rows")},
    # QKV rows are [all query heads | all key groups | all value groups]; SwiGLU's dense_h_to_4h rows are
    # [gate | up], each ffn_hidden_size long: every part splits on its own.
    column={"transformer.encoder.layers.{}.self_attention.query_key_value":
            (("heads", 1), ("kv_groups", 1), ("kv_groups", 1)),
            "transformer.encoder.layers.{}.mlp.dense_h_to_4h": (("ffn", 1), ("ffn", 1))},
    row={"transformer.encoder.layers.{}.self_attention.dense": (("heads", 1),),
         "transformer.encoder.layers.{}.mlp.dense_4h_to_h": (("ffn", 1),)},
    reduce=("transformer.encoder.layers.{}.self_attention", "transformer.encoder.layers.{}.mlp"),
    local_counts={"transformer.encoder.layers.{}.self_attention.heads": "heads",
                  "transformer.encoder.layers.{}.self_attention.kv_heads": "kv_groups"},
    kv_cache_unit="kv_groups",
    embedding="transformer.embedding.word_embeddings",
    output="transformer.output_layer",
    replicable=("kv_groups",),
)


# GLM-4's configs/lora.yaml: r 8, alpha 32, dropout 0.1, query_key_value.
GLM4V_LORA = {"rank": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": ("self_attention.query_key_value",)}

# HF ``chat``/``stream_chat``: do_sample, top_p 0.8, temperature 0.8, HF's implicit top_k 50, the guard
# forcing id 198 (reference-spec C7).
GLM4_FORCED_ID = 198
GLM4V_SAMPLING = {"temperature": 0.8, "top_p": 0.8, "top_k": 50, "do_sample": True,
                  "invalid_score_forced_id": GLM4_FORCED_ID}


def glm4v_prompt_ids(model: nn.Module, tokenizer, query: str, history: Sequence[tuple[str, str]],
                     image: bool, english: bool | None) -> tuple[list[int], int | None]:
    """GLM-4's chat template with the image placeholder widened to the model's image tokens."""
    ids, _ = tokenizer.apply_chat_template(glm4_messages(query, history, image=image), add_generation_prompt=True)
    return model.expand_image_placeholders(ids)


def widen_image_placeholders(model: GLM4VForCausalLM, ids: list[int]) -> tuple[list[int], int | None]:
    """``<|begin_of_image|> <|endoftext|> <|end_of_image|>`` widened to the image's vectors, and where the
    image starts (None: no image in ``ids``)."""
    return model.expand_image_placeholders(ids)


def glm4v_stop_ids(config: GLM4VConfig) -> tuple[int, ...]:
    """GLM-4V-9B's three stop ids (``<|endoftext|>``, ``<|user|>``, ``<|observation|>``)."""
    return tuple(config.stop_ids)


GLM4V = FamilySpec(
    name=GLM4VConfig.family,
    display_name="GLM-4V-9B",
    chat_label="GLM-4V",
    config_class=GLM4VConfig,
    model_class=GLM4VForCausalLM,
    tokenizer_class=GLM4Tokenizer,
    keymaps={"hf": GLM4V_HF},
    # The vision tower and the output layer (a matrix of its own, not tied) stay unless asked.
    quant_skip=("transformer.output_layer", "transformer.vision.*"),
    quant_optional={"vision": ("transformer.vision.*",), "output": ("transformer.output_layer",)},
    vision_tower="transformer.vision",
    tp_plan=GLM4_TP,
    lora=GLM4V_LORA,
    sampling=GLM4V_SAMPLING,
    max_length=8192,
    build_prompt=glm4v_prompt_ids,
    stop_ids=glm4v_stop_ids,
    postprocess="strip",
    example_per_turn=False,
    hf_chat="messages",
    hf_tokenizer_template=True,
    image_placeholders=widen_image_placeholders,
)
