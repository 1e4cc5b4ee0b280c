"""ChatGLM-6B (first generation, text only): its key maps, plans and reference defaults."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from visualglm.config import ChatGLMConfig
from visualglm.families.spec import FamilySpec, KeyMap
from visualglm.models.chatglm import ChatGLMForCausalLM
from visualglm.models.plans import TensorParallelPlan, Unit
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.templates import chatglm_prompt

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


# Tensor parallelism (see visualglm.models.plans for what a plan says).
CHATGLM_TP = TensorParallelPlan(
    units={"heads": Unit("num_attention_heads", "head_dim", "attention heads"),
           "ffn": Unit("inner_hidden_size", 1, "MLP features (inner_hidden_size)"),
           "vocab": Unit("vocab_size", 1, "vocabulary rows")},
    # The fused QKV rows are laid out per head, [q_h | k_h | v_h] for each head h (see chatglm.py), so a
    # rank's heads are one contiguous block of 3 * head_dim rows each.
    column={"transformer.layers.{}.attention.query_key_value": (("heads", 3),),
            "transformer.layers.{}.mlp.dense_h_to_4h": (("ffn", 1),)},
    row={"transformer.layers.{}.attention.dense": (("heads", 1),),
         "transformer.layers.{}.mlp.dense_4h_to_h": (("ffn", 1),)},
    reduce=("transformer.layers.{}.attention", "transformer.layers.{}.mlp"),
    local_counts={"transformer.layers.{}.attention.num_heads": "heads"},
    kv_cache_unit="heads",
    embedding="transformer.word_embeddings",
    output="lm_head",
)


# The reference recipes: ChatGLM-6B had no LoRA recipe, so it gets VisualGLM-6B's (r 10, alpha 1, attention
# qkv + dense), whose language model it is.
CHATGLM_LORA = {"rank": 10, "alpha": 1.0, "dropout": 0.0,
                "target_modules": ("attention.query_key_value", "attention.dense")}

# HF ``chat``/``stream_chat``: do_sample, top_p 0.7, temperature 0.95, HF's implicit top_k 50, the
# InvalidScoreLogitsProcessor forcing id 5 (reference-spec A7).
CHATGLM_FORCED_ID = 5
CHATGLM_SAMPLING = {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "do_sample": True,
                    "invalid_score_forced_id": CHATGLM_FORCED_ID}


def chatglm_prompt_ids(model: nn.Module, tokenizer, query: str, history: Sequence[tuple[str, str]],
                       image: bool, english: bool | None) -> tuple[list[int], None]:
    """ChatGLM-6B ``chat()``'s prompt ids (text only: ``image`` and ``english`` do not apply)."""
    return tokenizer.encode(chatglm_prompt(query, list(history))), None


def eos_stop_ids(config) -> tuple[int, ...]:
    """ChatGLM's answers end with its end-of-text id ``<eop>``."""
    return (config.eos_token_id,)


CHATGLM = FamilySpec(
    name=ChatGLMConfig.family,
    display_name="ChatGLM-6B",
    chat_label="ChatGLM",
    config_class=ChatGLMConfig,
    model_class=ChatGLMForCausalLM,
    tokenizer_class=ChatGLMTokenizer,
    keymaps={"hf": CHATGLM_HF, "sat": CHATGLM_SAT},
    # The reference quantizes the transformer linears only; the embeddings and the (tied) lm_head stay. The
    # output layer is tied to the word embeddings: "output" removes no pattern, the loader gives it an INT8
    # copy of its own and the embedding lookup keeps the float matrix (visualglm.quant.output).
    quant_skip=("lm_head",),
    quant_optional={"output": ()},
    vision_tower=None,
    tp_plan=CHATGLM_TP,
    lora=CHATGLM_LORA,
    sampling=CHATGLM_SAMPLING,
    max_length=2048,
    build_prompt=chatglm_prompt_ids,
    stop_ids=eos_stop_ids,
    postprocess="full-width",
    example_per_turn=True,
    answer_encoding={"add_special_tokens": False},
    sat_model_class="ChatGLMModel",
    thudm_quantized=True,
    hf_chat="text",
    hf_prompt_text=chatglm_prompt,
)
