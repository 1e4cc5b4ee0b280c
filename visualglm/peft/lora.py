"""LoRA by composition: ``LoRALinear`` wraps any linear-like module, quantized ones included (QLoRA).

``y = base(x) + scaling * B(A(dropout(x)))`` with ``A`` ``[r, in]`` (Kaiming-uniform), ``B`` ``[out, r]`` (zeros,
so a fresh adapter changes nothing) and ``scaling = alpha / r``. The base module stays untouched and frozen,
so the same wrapper serves ``nn.Linear``, bf16 CPU linears and the weight-only ``Int8Linear``/``Int4Linear``.
Submodule names (``base_layer``, ``lora_A``, ``lora_B``) follow the ``peft`` library, so adapter files use
its key names (see ``visualglm.peft.io``).

Reference options (VisualGLM-6B ``finetune_visualglm.py``): target modules, ``layer_range`` as a LIST of
layer indices (``--layer_range 0 14`` = layers 0 and 14), rank, alpha, dropout. The reference splits the
fused QKV adapter into three rank-r pairs; here, as in ``peft``, each target module gets one (A, B) pair.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from visualglm.families import family_spec

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class LoraConfig:
    """Which modules get an adapter and how big it is.

    ``target_modules``: names matched against the end of qualified module names (``"attention.dense"``
    hits ``transformer.layers.3.attention.dense``), or fnmatch patterns on the whole name.
    ``layer_range``: language-model layer indices to adapt (None = all). ``exclude``: fnmatch patterns never
    adapted (default: the vision tower).
    """

    rank: int = 10
    alpha: float = 1.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("attention.query_key_value", "attention.dense")
    layer_range: list[int] | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def for_family(cls, family, **overrides) -> LoraConfig:
        """The reference defaults of a model family (a name, config or model; ``FamilySpec.lora``), with
        overrides (None = keep). The family's vision tower is excluded: it stays frozen."""
        spec = family_spec(family)
        values = dict(spec.lora)
        if spec.vision_tower is not None:
            values["exclude"] = (spec.vision_tower + ".*",)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

    def validate(self) -> LoraConfig:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        if self.layer_range is not None and any(int(i) < 0 for i in self.layer_range):
            raise ValueError(f"layer_range holds layer indices >= 0, got {self.layer_range}")
        return self


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (``nn.Linear``, quantized, wrapped)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = module.weight
    return int(weight.shape[1]), int(weight.shape[0])


def is_quantized(module: nn.Module) -> bool:
    """Weight-only quantized linears expose ``dequantize()`` and keep their weights in buffers."""
    return callable(getattr(module, "dequantize", None))


class _FrozenQuantizedLinear(torch.autograd.Function):
    """A quantized linear whose input needs a gradient: the forward runs the fast weight-only kernel and
    saves nothing big; the backward dequantizes the weight again for ``grad_x = grad_y @ W``. Autograd
    through the plain dequantize path would keep every layer's dequantized weight alive until backward,
    i.e. the whole model in floating point."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.base = base
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            return type(base).forward(base, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight = ctx.base.dequantize(grad_out.dtype)  # [out, in]
        return (grad_out @ weight).to(ctx.x_dtype), None


def frozen_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)`` for a frozen base module; quantized bases keep activation memory low (see above)."""
    if is_quantized(base):
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantizedLinear.apply(x, base)
        return type(base).forward(base, x)  # the class's forward: the instance's may be routed here
    return base(x)


def route_frozen_quantized(model: nn.Module) -> int:
    """Send every quantized linear of ``model`` through ``frozen_forward`` (by setting the instance's
    ``forward``; names and types do not change). Needed for the ones without an adapter too: once any
    earlier layer is trainable their input needs a gradient, and their own dequantize path would keep a
    float copy of each weight for the backward, i.e. the whole model. Returns how many."""
    count = 0
    for module in model.modules():
        if is_quantized(module) and not isinstance(module, LoRALinear):
            module.forward = functools.partial(frozen_forward, module)
            count += 1
    return count


class LoRALinear(nn.Module):
    """A frozen linear-like ``base_layer`` plus a trainable low-rank update.

    x ``[..., in]`` -> ``[..., out]``. The adapter weights are float32 (whatever the base dtype) so the
    optimizer works on full-precision values; the update is cast to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        device = next(iter(base_layer.buffers()), None)
        device = next(iter(base_layer.parameters()), device)
        device = device.device if device is not None else None
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference (sat lora2, peft): A Kaiming-uniform with a=sqrt(5), B zeros.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_forward(self.base_layer, x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` ``[out, in]`` in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def layer_index(name: str) -> int | None:
    """The index after the first ``layers.`` in a qualified module name (None outside a layer stack)."""
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else None


def _is_target(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) or fnmatch.fnmatchcase(name, t) for t in targets)


def lora_target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Qualified names of the modules ``config`` selects (linear-like, not excluded, in ``layer_range``)."""
    layers = None if config.layer_range is None else {int(i) for i in config.layer_range}
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALinear) or not _linear_like(module):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude) or not _is_target(name, config.target_modules):
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        names.append(name)
    return names


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_quantized(module):
        return True
    weight = getattr(module, "weight", None)
    return getattr(weight, "ndim", 0) == 2 and hasattr(module, "in_features")


def inject_lora(model: nn.Module, config: LoraConfig, names: Sequence[str] | None = None) -> list[str]:
    """Wrap the selected modules of ``model`` in ``LoRALinear`` (in place); freeze everything else.

    ``names`` overrides the selection (used when loading an adapter). Returns the wrapped names; raises when
    nothing matches, or a ``layer_range`` index does not exist, so that a typo cannot train nothing.
    """
    config.validate()
    selected = list(names) if names is not None else lora_target_names(model, config)
    if not selected:
        raise ValueError(f"no module matches the LoRA targets {list(config.target_modules)}"
                         + (f" in layers {config.layer_range}" if config.layer_range is not None else ""))
    if config.layer_range is not None and names is None:
        found = {layer_index(n) for n in selected}
        missing = sorted({int(i) for i in config.layer_range} - found)
        if missing:
            raise ValueError(f"layer_range: the model has no layer(s) {missing} with targets "
                             f"{list(config.target_modules)}")
    freeze(model)
    route_frozen_quantized(model)
    for name in selected:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        setattr(parent, child, LoRALinear(base, config.rank, config.alpha, config.dropout))
    return selected


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{qualified name: LoRALinear}`` of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze(model: nn.Module) -> None:
    """No parameter of ``model`` requires grad (adapters added afterwards bring their own)."""
    for param in model.parameters():
        param.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights (buffers) count toward the total by their
    logical size, so the ratio means the same with and without quantization."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if is_quantized(module):
            in_features, out_features = linear_shape(module)
            total += in_features * out_features
    return trainable, total


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Fold every adapter into its base weight and put the plain base module back; returns how many.

    ``W' = W + scaling * B @ A`` in float32. A quantized base is dequantized first, so the merged weight is
    exactly the function the adapter was trained against (the reference merged QLoRA against the wrong
    codebook); it becomes an ``nn.Linear`` in ``dtype`` (default: its bias's dtype, else bfloat16). A float
    base keeps its module type and dtype; its weight is replaced, never written in place (it may be a
    read-only memory map of the checkpoint).
    """
    merged = 0
    for name, module in list(lora_modules(model).items()):
        base = module.base_layer
        delta = module.delta_weight()
        if is_quantized(base):
            bias = getattr(base, "bias", None)
            target = dtype or (bias.dtype if bias is not None and bias.is_floating_point() else torch.bfloat16)
            weight = base.dequantize(torch.float32)
            weight = weight + delta.to(weight.device)
            new = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                            device=weight.device, dtype=target)
            with torch.no_grad():
                new.weight.copy_(weight)
                if bias is not None:
                    new.bias.copy_(bias)
            new.requires_grad_(False)
        else:
            weight = base.weight
            new_weight = (weight.float() + delta.to(weight.device)).to(dtype or weight.dtype)
            base.weight = nn.Parameter(new_weight, requires_grad=False)
            if dtype is not None and getattr(base, "bias", None) is not None:
                base.bias = nn.Parameter(base.bias.to(dtype), requires_grad=False)
            new = base
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        merged += 1
    return merged


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every weight-only quantized linear by an ``nn.Linear`` of its dequantized weight."""
    count = 0
    for name, module in list(model.named_modules()):
        if not name or not is_quantized(module) or isinstance(module, LoRALinear):
            continue
        in_features, out_features = linear_shape(module)
        bias = getattr(module, "bias", None)
        weight = module.dequantize(torch.float32)
        new = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        new.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        count += 1
    return count


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under our names (``<module>.lora_A.weight``, ``<module>.lora_B.weight``)."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{name}.lora_B.weight"] = module.lora_B.weight
    return out


__all__ = ["LoRALinear", "LoraConfig", "count_parameters", "dequantize_model",
           "freeze", "frozen_forward", "inject_lora", "lora_modules", "lora_state_dict", "lora_target_names",
           "merge_lora", "route_frozen_quantized"]
