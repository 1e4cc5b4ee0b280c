"""Per-model plans kept as data: which modules stay in floating point when the model is quantized, and how
tensor parallelism splits each model over several processes.

The references quantize only the language model's transformer linears: ChatGLM-6B keeps its embeddings
and ``lm_head``; VisualGLM-6B's README advises against quantizing the vision encoder (its error is
large); GLM-4V-9B's vision tower and output layer stay too. Patterns are fnmatch on module names.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANT_SKIP: dict[str, tuple[str, ...]] = {
    "chatglm": ("lm_head",),
    "visualglm": ("lm_head", "image_encoder.*"),
    "glm4v": ("transformer.output_layer", "transformer.vision.*"),
}

# Parts a user may ask to quantize as well (``quantize_also``): each removes its patterns from the skip
# list. ChatGLM-6B's and VisualGLM-6B's output layer is tied to the word embeddings (one matrix serves
# both): there "output" removes no pattern; the loader gives the output layer an INT8 copy of its own and
# the embedding lookup keeps the float matrix (``visualglm.quant.output``). GLM-4V-9B's is a matrix of its
# own, quantized by the plan.
QUANT_OPTIONAL: dict[str, dict[str, tuple[str, ...]]] = {
    "chatglm": {"output": ()},
    "visualglm": {"vision": ("image_encoder.*",), "output": ()},
    "glm4v": {"vision": ("transformer.vision.*",), "output": ("transformer.output_layer",)},
}


def quant_skip(family: str, also: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The skip patterns for ``family`` once the optional parts named in ``also`` are quantized too."""
    optional = QUANT_OPTIONAL[family]
    unknown = [part for part in also if part not in optional]
    if unknown:
        offered = ", ".join(sorted(optional)) or "none"
        raise ValueError(f"cannot also quantize {', '.join(map(repr, unknown))} in a {family} model "
                         f"(optional parts offered: {offered})")
    dropped = {pattern for part in also for pattern in optional[part]}
    return tuple(pattern for pattern in QUANT_SKIP[family] if pattern not in dropped)


# The image encoder of each family (None: text only). A text decode step never reads it.
VISION_TOWER: dict[str, str | None] = {"chatglm": None, "visualglm": "image_encoder", "glm4v": "transformer.vision"}


# --- Tensor parallelism -----------------------------------------------------------------------------------
# A plan says, for one family, which linears split along their outputs (column-parallel: each rank computes
# some output features) or their inputs (row-parallel: each rank holds some input features and the partial
# outputs are summed over the ranks), in units of what: attention heads, key/value groups, MLP features.
# ``visualglm.distributed.tp`` applies it to a model built on the meta device before its weights load, so
# every rank reads only its slices of the checkpoint. Module names use ``{}`` for the layer index, as the
# key maps do. Anything no plan names (norms, the vision towers, VisualGLM's Q-Former) is replicated.


@dataclass(frozen=True)
class Unit:
    """A splittable dimension: ``count`` blocks (a config attribute) of ``width`` rows each (a config
    attribute or a number); ``label`` names it in errors ("32 attention heads ...")."""

    count: str
    width: str | int
    label: str


# A layout is the run of sections along the split dimension of one weight: ``(unit, repeat)`` means
# ``count`` consecutive blocks of ``repeat * width`` rows. Each rank takes its share of every section.
Layout = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class TensorParallelPlan:
    units: dict[str, Unit]
    column: dict[str, Layout]  # output rows split; the bias splits with them
    row: dict[str, Layout]  # input columns split; the bias is added once (rank 0 keeps it, others hold 0)
    reduce: tuple[str, ...]  # modules whose output ends in a row-parallel linear: all-reduce (sum) it
    local_counts: dict[str, str]  # "module.attribute" holding a per-rank count -> its unit
    kv_cache_unit: str  # the unit the KV cache is laid out in (heads per rank)
    embedding: str  # nn.Embedding split by vocabulary rows (rows outside a rank's range look up 0, summed)
    output: str  # vocabulary projection split by rows; the model's logits are gathered over the ranks
    vocab_unit: str = "vocab"
    # Units whose blocks are replicated when there are more ranks than blocks (GLM-4's two key/value groups
    # on 4 ranks: each rank keeps the group its query heads read, as Megatron and vLLM do).
    replicable: tuple[str, ...] = ()


_CHATGLM_TP = TensorParallelPlan(
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

_GLM4_TP = TensorParallelPlan(
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

# VisualGLM-6B's language model is ChatGLM-6B under the same names; its image encoder is replicated.
TP_PLANS: dict[str, TensorParallelPlan] = {"chatglm": _CHATGLM_TP, "visualglm": _CHATGLM_TP, "glm4v": _GLM4_TP}
