"""Replace the linear layers of any module tree by weight-only quantized ones."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

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


def quantize_model(model: nn.Module, bits: int, *, group_size: int = 128, symmetric: bool = False,
                   skip: SkipSpec = ()) -> int:
    """Quantize every linear-like submodule of ``model`` in place whose qualified name is not skipped.

    ``bits`` 8: per-channel ``Int8Linear``; 4: group-wise ``Int4Linear`` (``group_size``, or the largest kernel
    group size dividing ``in_features``; layers whose ``in_features`` is not a multiple of 32 stay float).
    ``skip``: fnmatch patterns on qualified names, or a predicate ``(name, module) -> bool``.
    Returns the number of replaced modules. The new weights are buffers (no gradients).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    skipped = _skip_fn(skip)
    targets = []
    for name, module in model.named_modules():
        if name and is_linear_like(module) and not skipped(name, module):
            targets.append((name, module))
    count = 0
    for name, module in targets:
        if bits == 8:
            new: nn.Module = Int8Linear.from_linear(module)
        else:
            g = Int4Linear.pick_group_size(module.weight.shape[1], group_size)
            if g is None:
                continue
            new = Int4Linear.from_linear(module, group_size=g, symmetric=symmetric)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        count += 1
    return count
