"""Tensor parallelism: split a built model over the ranks of a process group, following its plan.

``apply_tensor_parallel(model)`` transforms a model built on the meta device (before its weights load):

- column-parallel linears (QKV, the MLP's first projection) keep this rank's output rows: its attention
  heads, its key/value groups, its MLP features;
- row-parallel linears (the attention output, the MLP's second projection) keep the matching input
  columns; the module whose output they produce gets a forward hook that sums (all-reduces) it;
- the per-rank head counts the attention code reads (``num_heads``, ``heads``, ``kv_heads``) and the KV
  cache layout are divided, so the cache holds this rank's heads only;
- the word embedding and the vocabulary projection are split by vocabulary rows: an embedding lookup
  outside a rank's rows gives 0 and the ranks sum; the model's logits are gathered over the ranks.

It returns a ``Sharding``, the loader's per-tensor hook: ``sharding(name, full_tensor)`` is this rank's
slice, so each rank reads only its part of a memory-mapped checkpoint. A model whose weights are already
loaded (a SwissArmyTransformer checkpoint, or one already quantized) is sliced in place instead.
Nothing in the model code knows about any of this: modules are resized, wrapped or hooked, as the plan
(``FamilySpec.tp_plan``) says. The vision towers are replicated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from visualglm.families import family_spec
from visualglm.models.plans import Layout, TensorParallelPlan
from visualglm.quant.linear import Int4Linear, Int8Linear


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks (the message names the count that does not divide)."""


@dataclass(frozen=True)
class ShardSpec:
    """This rank's part of one full tensor: the ``(start, length)`` ranges along ``dim``, concatenated and
    zero-padded to ``pad_to`` rows; ``zero``: the rank holds zeros of the full shape (a row-parallel bias,
    added by rank 0 only)."""

    dim: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    pad_to: int | None = None
    zero: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.zero:
            return torch.zeros_like(tensor)
        pieces = [tensor.narrow(self.dim, start, length) for start, length in self.ranges]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)
        if self.pad_to is not None and out.shape[self.dim] < self.pad_to:
            pad_shape = list(out.shape)
            pad_shape[self.dim] = self.pad_to - out.shape[self.dim]
            out = torch.cat((out, out.new_zeros(pad_shape)), dim=self.dim)
        # A single dim-0 range stays a view of the (memory-mapped) source: no copy, only its pages are read.
        return out.contiguous()

    def length(self, full: int) -> int:
        if self.zero:
            return full
        return max(sum(length for _, length in self.ranges), self.pad_to or 0)


class Sharding:
    """What one rank holds, as ``{parameter name: ShardSpec}``; call it as the loader's per-tensor hook."""

    def __init__(self, rank: int, world_size: int, specs: dict[str, ShardSpec]) -> None:
        self.rank, self.world_size, self.specs = rank, world_size, specs

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full checkpoint tensor of parameter ``name`` (others pass through)."""
        spec = self.specs.get(name)
        return tensor if spec is None else spec.take(tensor)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows ``[start, start + rows)`` of a ``[num_embeddings, dim]`` embedding (zero-padded past
    the vocabulary). Ids outside them look up 0; summing over the ranks gives the full lookup exactly.
    ``num_embeddings`` stays the full vocabulary (callers read it to know which ids exist)."""

    def __init__(self, weight: torch.Tensor, num_embeddings: int, start: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, weight.shape[1]
        self.start, self.stop = start, min(start + weight.shape[0], num_embeddings)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids ``[*]`` -> ``[*, dim]``, identical on every rank."""
        outside = (input_ids < self.start) | (input_ids >= self.stop)
        local = (input_ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows=[{self.start}, {self.stop})"


def _pattern(template: str) -> re.Pattern:
    """A plan name with ``{}`` for the layer index -> a regex matching whole module names."""
    return re.compile(re.escape(template).replace(re.escape("{}"), r"\d+") + r"\Z")


def _matches(name: str, templates) -> str | None:
    for template in templates:
        if _pattern(template).match(name):
            return template
    return None


def _unit_sizes(plan: TensorParallelPlan, config) -> dict[str, tuple[int, int]]:
    """``{unit: (count, width)}`` read from the config."""
    sizes = {}
    for unit, spec in plan.units.items():
        width = spec.width if isinstance(spec.width, int) else int(getattr(config, spec.width))
        sizes[unit] = (int(getattr(config, spec.count)), width)
    return sizes


def check_split(plan: TensorParallelPlan, config, world_size: int) -> None:
    """Raise ``TensorParallelError`` naming the first count that does not split over ``world_size`` ranks."""
    if world_size < 1:
        raise TensorParallelError(f"the tensor-parallel size must be at least 1, got {world_size}")
    for unit, (count, _) in _unit_sizes(plan, config).items():
        if unit == plan.vocab_unit or count % world_size == 0:
            continue  # the vocabulary is padded to a multiple of the ranks instead
        label = plan.units[unit].label
        if unit in plan.replicable:
            if world_size % count == 0:
                continue
            raise TensorParallelError(
                f"cannot split {count} {label} over {world_size} ranks: the tensor-parallel size must divide "
                f"{count} or be a multiple of it")
        raise TensorParallelError(f"cannot split {count} {label} evenly over {world_size} ranks: choose a "
                                  f"tensor-parallel size that divides {count}")


def _share(unit: str, count: int, rank: int, world_size: int, plan: TensorParallelPlan) -> tuple[int, int]:
    """(first block, number of blocks) of ``unit`` this rank holds."""
    if count % world_size == 0:
        per_rank = count // world_size
        return rank * per_rank, per_rank
    if unit in plan.replicable and world_size % count == 0:
        return rank * count // world_size, 1  # the block this rank's query heads use
    raise TensorParallelError(f"cannot split {count} {plan.units[unit].label} over {world_size} ranks")


def _layout_ranges(layout: Layout, sizes: dict[str, tuple[int, int]], rank: int, world_size: int,
                   plan: TensorParallelPlan) -> tuple[tuple[int, int], ...]:
    """``(start, length)`` of this rank's rows in each section of ``layout``."""
    ranges, offset = [], 0
    for unit, repeat in layout:
        count, width = sizes[unit]
        block = width * repeat
        first, blocks = _share(unit, count, rank, world_size, plan)
        ranges.append((offset + first * block, blocks * block))
        offset += count * block
    return tuple(ranges)


def plan_sharding(model: nn.Module, rank: int, world_size: int) -> tuple[Sharding, dict[str, int]]:
    """This rank's ``Sharding`` of ``model`` and the per-rank count of every unit (no model change)."""
    config = model.config
    plan = family_spec(config).tp_plan
    check_split(plan, config, world_size)
    sizes = _unit_sizes(plan, config)
    specs: dict[str, ShardSpec] = {}
    for name, _module in model.named_modules():
        if (layout := plan.column.get(_matches(name, plan.column) or "")) is not None:
            ranges = _layout_ranges(layout, sizes, rank, world_size, plan)
            specs[f"{name}.weight"] = specs[f"{name}.bias"] = ShardSpec(0, ranges)
        elif (layout := plan.row.get(_matches(name, plan.row) or "")) is not None:
            specs[f"{name}.weight"] = ShardSpec(1, _layout_ranges(layout, sizes, rank, world_size, plan))
            if rank != 0:
                specs[f"{name}.bias"] = ShardSpec(zero=True)
    vocab, _ = sizes[plan.vocab_unit]
    rows = -(-vocab // world_size)  # ceil: the last rank's rows are zero-padded
    start = min(rank * rows, vocab)
    vocab_spec = ShardSpec(0, ((start, min(rows, vocab - start)),), pad_to=rows)
    specs[f"{plan.embedding}.weight"] = specs[f"{plan.output}.weight"] = vocab_spec
    local = {unit: _share(unit, count, rank, world_size, plan)[1] for unit, (count, _) in sizes.items()
             if unit != plan.vocab_unit}
    local[plan.vocab_unit] = rows
    return Sharding(rank, world_size, specs), local


def apply_tensor_parallel(model: nn.Module, rank: int | None = None, world_size: int | None = None,
                          group: dist.ProcessGroup | None = None) -> Sharding:
    """Split ``model`` for this rank following its family's ``tp_plan``; returns the loader hook.

    ``rank``/``world_size`` default to the process group's (which must be initialized). On a meta-device
    model the parameters are only reshaped (load the weights through the returned hook); on a loaded one
    they are sliced now, quantized linears included. Raises ``TensorParallelError`` when a head, group or
    MLP count does not divide.
    """
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("tensor parallelism needs an initialized process group (launch with torchrun)")
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    plan = family_spec(model).tp_plan
    sharding, local = plan_sharding(model, rank, world_size)
    for name, module in list(model.named_modules()):
        if f"{name}.weight" in sharding.specs and name != plan.embedding:
            _shard_linear(model, name, module, sharding, rank)
    _shard_embedding(model, plan.embedding, sharding, group)
    for key, unit in plan.local_counts.items():
        module_template, _, attribute = key.rpartition(".")
        for name, module in model.named_modules():
            if _pattern(module_template).match(name):
                setattr(module, attribute, local[unit])
    for name, module in model.named_modules():
        if _matches(name, plan.reduce):
            module.register_forward_hook(_all_reduce_output(group))
    # The logits are gathered where the model turns hidden states into logits (``output_logits``, which
    # ``forward`` and the engine's staged prefill both call), not on the output linear itself: quantization
    # and the CPU kernels may replace that module after loading, and a hook on it would go with it.
    gather = _gather_logits(group, world_size, int(getattr(model.config, plan.units[plan.vocab_unit].count)))
    local_logits = model.output_logits
    model.output_logits = lambda hidden: gather(local_logits(hidden))
    _, head_dim = model.kv_cache_layout()
    cache_heads = local[plan.kv_cache_unit]
    model.kv_cache_layout = lambda: (cache_heads, head_dim)  # the instance's cache holds this rank's heads
    model.tensor_parallel = sharding
    model.tie_weights()  # the resized embedding and output layer share one shard again
    return sharding


def _shard_linear(model: nn.Module, name: str, module: nn.Module, sharding: Sharding, rank: int) -> None:
    """Resize (meta) or slice (loaded) one linear-like module in place, or swap a quantized one."""
    spec = sharding.specs[f"{name}.weight"]
    if isinstance(module, (Int8Linear, Int4Linear)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, shard_quantized(module, spec, keep_bias=rank == 0 or spec.dim == 0))
        return
    weight = module.weight
    if weight.device.type == "meta":
        shape = list(weight.shape)
        shape[spec.dim] = spec.length(shape[spec.dim])
        new_weight = torch.empty(shape, dtype=weight.dtype, device="meta")
    else:
        new_weight = spec.take(weight.detach()).clone()  # own the slice: the full tensor can be freed
    module.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    bias = getattr(module, "bias", None)
    bias_spec = sharding.specs.get(f"{name}.bias")
    if bias is not None and bias_spec is not None:
        new_bias = (torch.empty(bias_spec.length(bias.shape[0]), dtype=bias.dtype, device="meta")
                    if bias.device.type == "meta" else bias_spec.take(bias.detach()).clone())
        module.bias = nn.Parameter(new_bias, requires_grad=bias.requires_grad)
    if hasattr(module, "out_features"):
        module.out_features, module.in_features = new_weight.shape


def _shard_embedding(model: nn.Module, name: str, sharding: Sharding, group) -> None:
    embedding = model.get_submodule(name)
    spec = sharding.specs[f"{name}.weight"]
    weight = embedding.weight
    if weight.device.type == "meta":
        rows = torch.empty(spec.length(weight.shape[0]), weight.shape[1], dtype=weight.dtype, device="meta")
    else:
        rows = spec.take(weight.detach()).clone()
    parent_name, _, child = name.rpartition(".")
    replacement = VocabParallelEmbedding(rows, embedding.num_embeddings, spec.ranges[0][0], group)
    setattr(model.get_submodule(parent_name), child, replacement)


def shard_quantized(module: Int8Linear | Int4Linear, spec: ShardSpec, keep_bias: bool) -> nn.Module:
    """This rank's part of an already quantized linear: the stored codes are sliced along the split
    dimension, so the result equals quantizing the same slice of the full model (INT8 keeps each row's
    scale; INT4 slices whole groups of input columns). ``keep_bias``: False for a row-parallel linear off
    rank 0 (the bias is added once)."""
    bias = module.bias
    if bias is not None:
        bias = spec.take(bias).clone() if spec.dim == 0 else (bias if keep_bias else torch.zeros_like(bias))
    if isinstance(module, Int8Linear):
        scale = spec.take(module.scale).clone() if spec.dim == 0 else module.scale
        return Int8Linear(spec.take(module.weight).clone(), scale, bias)
    group = module.group_size
    if spec.dim == 1 and any(start % group or length % group for start, length in spec.ranges):
        raise TensorParallelError(f"INT4 groups of {group} input columns do not align with this rank's "
                                  f"columns {spec.ranges}: quantize after splitting instead")
    codes = module.codes().to(torch.int32)  # [out, in]
    sz = module.scales_and_zeros.float()[:, : module.out_features].transpose(0, 1)  # [out, in/g, 2]
    codes = spec.take(codes)
    if spec.dim == 0:
        sz = spec.take(sz)
    else:
        sz = ShardSpec(1, tuple((s // group, n // group) for s, n in spec.ranges)).take(sz)
    return Int4Linear._from_codes(codes, sz[..., 0].contiguous(), sz[..., 1].contiguous(), group, bias)


def _all_reduce_output(group) -> Callable:
    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)  # the partial sums of the row-parallel linear: [B, T, hidden]
        return output

    return hook


def _gather_logits(group, world_size: int, vocab: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def gather(logits: torch.Tensor) -> torch.Tensor:
        # logits [B, T, rows] -> [B, T, vocab]: every rank's rows in order, the padding dropped.
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(parts, logits, group=group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    return gather
