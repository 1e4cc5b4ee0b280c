"""Replace the linear layers of any module tree by weight-only quantized ones."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch
from torch import nn

from visualglm.quant.linear import Int4Linear, Int8Linear

SkipSpec = Callable[[str, nn.Module], bool] | Iterable[str]


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or anything shaped like one (2-D ``weight``, ``in_features``, optional ``bias``)."""
    if isinstance(module, (Int8Linear, Int4Linear)):
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return getattr(weight, "ndim", 0) == 2 and hasattr(module, "in_features")


def _skip_fn(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)

    def matches(name: str, _module: nn.Module) -> bool:
        # A pattern matches the whole qualified name or its tail after a dot ("lm_head" also hits "model.lm_head").
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)

    return matches


def plan_quantization(model: nn.Module, bits: int, *, group_size: int = 128, skip: SkipSpec = ()
                      ) -> dict[str, int | None]:
    """Which submodules ``quantize_model`` would replace: qualified name -> int4 group size (None for
    int8). Works on a model built on the meta device (only shapes are read)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    skipped = _skip_fn(skip)
    plan: dict[str, int | None] = {}
    for name, module in model.named_modules():
        if not name or not is_linear_like(module) or skipped(name, module):
            continue
        if bits == 8:
            plan[name] = None
            continue
        g = Int4Linear.pick_group_size(module.weight.shape[1], group_size)
        if g is not None:  # layers no kernel group size divides stay float
            plan[name] = g
    return plan


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_empty(model: nn.Module, plan: dict[str, int | None], bits: int,
               bias_dtype: torch.dtype | None = None) -> dict[str, Int8Linear | Int4Linear]:
    """Replace the planned linears by quantized modules with unfilled (meta) buffers, to be filled while a
    checkpoint streams in. Returns the new modules by name. ``bias_dtype`` None keeps each bias's dtype."""
    new_modules: dict[str, Int8Linear | Int4Linear] = {}
    for name, group_size in plan.items():
        module = model.get_submodule(name)
        out_features, in_features = module.weight.shape
        bias = getattr(module, "bias", None)
        dtype = None if bias is None else (bias_dtype or bias.dtype)
        if bits == 8:
            new: Int8Linear | Int4Linear = Int8Linear.empty(out_features, in_features, dtype)
        else:
            if group_size is None:
                raise ValueError(f"{name}: int4 needs a group size")
            new = Int4Linear.empty(out_features, in_features, group_size, dtype)
        _replace(model, name, new)
        new_modules[name] = new
    return new_modules


def quantize_model(model: nn.Module, bits: int, *, group_size: int = 128, symmetric: bool = False,
                   skip: SkipSpec = ()) -> int:
    """Quantize every linear-like submodule of ``model`` in place whose qualified name is not skipped.

    ``bits`` 8: per-channel ``Int8Linear``; 4: group-wise ``Int4Linear`` (``group_size``, or the largest kernel
    group size dividing ``in_features``; layers whose ``in_features`` is not a multiple of 32 stay float).
    ``skip``: fnmatch patterns on qualified names, or a predicate ``(name, module) -> bool``.
    Returns the number of replaced modules. The new weights are buffers (no gradients).
    """
    plan = plan_quantization(model, bits, group_size=group_size, skip=skip)
    for name, g in plan.items():
        module = model.get_submodule(name)
        if bits == 8:
            new: nn.Module = Int8Linear.from_linear(module)
        else:
            new = Int4Linear.from_linear(module, group_size=g, symmetric=symmetric)
        _replace(model, name, new)
    return len(plan)
