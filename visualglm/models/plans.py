"""The shape of a tensor-parallel plan: how tensor parallelism splits a model over several processes.

Each family's plan (data of this shape) lives in its module of ``visualglm.families`` (``FamilySpec.tp_plan``),
with its quantization plan (``quant_skip``, ``quant_optional``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
