"""Quantized checkpoints: quantize while loading, our saved quantized format, THUDM's pre-quantized layout.

All three share one mechanism: the planned linears of the meta-built model are swapped for quantized modules
with unfilled buffers *before* any weight is read, then each checkpoint tensor that belongs to them is
routed here (``QuantizedLoader.take``) and turned into the quantized buffers right away. Nothing but the
current tensor (memory-mapped) and the quantized buffers is ever held, and the temporaries of each weight
are handed back to the system once it is done (``release_freed_memory``), so peak memory stays near the size
of the quantized model.

Formats read:
- any float checkpoint with ``quantize=8|4``: ``X.weight`` is cast to the load dtype, then quantized;
- ours (``config.json`` has ``quantization_config`` with ``quant_method: "visualglm"``): INT8 modules store
  ``X.weight`` int8 ``[out, in]`` + ``X.scale`` fp32 ``[out]``; INT4 modules ``X.qweight`` uint8 ``[out, in/2]``
  (plain nibble layout, see ``visualglm.quant.packing``) + ``X.scales_and_zeros`` bf16 ``[in/g, out, 2]``;
  biases ``X.bias`` as usual. Loaded as stored, never re-quantized;
- THUDM's chatglm-6b-int4 / -int8 (``config.json`` ``quantization_bit`` 4 or 8, spec A8): ``X.weight`` int8
  (int4: two values a byte) + ``X.weight_scale`` fp16 ``[out]`` for the four linears of every layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from visualglm.checkpoint.io import CheckpointError, TensorHook, release_freed_memory
from visualglm.checkpoint.keymaps import KeyMap, UnknownKeyError, map_key
from visualglm.config import AnyConfig
from visualglm.families import family_spec
from visualglm.quant.linear import INT4_GROUP_SIZES, Int4Linear, Int8Linear, quantized_bits
from visualglm.quant.swap import plan_quantization, swap_empty

QUANT_CONFIG_KEY = "quantization_config"
QUANT_METHOD = "visualglm"
FORMAT_VERSION = 1
DEFAULT_GROUP_SIZE = 128
# THUDM's rule (spec A8): the four linears of every ChatGLM-6B layer; embeddings, lm_head, norms stay float.
THUDM_QUANTIZED = ("transformer.layers.*.attention.query_key_value", "transformer.layers.*.attention.dense",
                   "transformer.layers.*.mlp.dense_h_to_4h", "transformer.layers.*.mlp.dense_4h_to_h")
# Tensor names of quantized modules besides ``weight``/``bias``.
QUANT_SUFFIXES = ("scale", "qweight", "scales_and_zeros", "weight_scale")


def quantize_bits(quantize: int | str) -> int:
    """The width a ``quantize`` argument asks for: 8 or 4 (ValueError for anything else)."""
    bits = {8: 8, 4: 4, "8": 8, "4": 4, "int8": 8, "int4": 4}.get(quantize)
    if bits is None:
        raise ValueError(f"quantize must be 8, 4, 'int8' or 'int4', got {quantize!r}")
    return bits


def quantization_plan_info(bits: int, skip: tuple[str, ...], group_size: int, symmetric: bool = False
                           ) -> dict:
    """How a model was quantized, as ``model.quantization`` records it (and config.json stores it)."""
    return {"symmetric": symmetric, "skip": list(skip), **({"group_size": group_size} if bits == 4 else {})}


def map_module_key(key: str, keymap: KeyMap) -> str | None:
    """Map a tensor key through ``keymap`` by its module: ``a.b.scale`` maps like ``a.b.weight`` (quantized
    tensors are not in the key maps). None when dropped; UnknownKeyError when unknown."""
    module, _, suffix = key.rpartition(".")
    if suffix not in QUANT_SUFFIXES:
        return map_key(key, keymap)
    mapped = map_key(module + ".weight", keymap)
    return None if mapped is None else mapped.rpartition(".")[0] + "." + suffix


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The weight-only quantized linears of ``model`` by name, whichever kernel form they run in."""
    return {name: m for name, m in model.named_modules() if quantized_bits(m) is not None}


def quantization_config(model: nn.Module) -> dict | None:
    """The ``quantization_config`` entry of config.json describing ``model``'s quantized modules (None when
    there are none). Raises ValueError for a mix of INT8 and INT4 modules, which the format does not hold."""
    modules = quantized_modules(model)
    if not modules:
        return None
    kinds = {quantized_bits(m) for m in modules.values()}
    if len(kinds) > 1:
        raise ValueError("the model mixes INT8 and INT4 modules; a quantized checkpoint holds one kind")
    bits = kinds.pop()
    info = dict(getattr(model, "quantization", None) or {})
    entry: dict = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": bits}
    if bits == 4:
        sizes = [m.group_size for m in modules.values()]
        group_size = info.get("group_size") or max(set(sizes), key=sizes.count)
        entry["group_size"] = group_size
        entry["group_size_overrides"] = {n: m.group_size for n, m in modules.items() if m.group_size != group_size}
    if "symmetric" in info:
        entry["symmetric"] = info["symmetric"]
    if "skip" in info:
        entry["skip"] = list(info["skip"])
    if "source" in info:
        entry["source"] = info["source"]
    entry["modules"] = sorted(modules)
    return entry


def prequantized_format(config: AnyConfig) -> str | None:
    """"stored" (our quantized format), "thudm" (``quantization_bit``) or None for a float checkpoint."""
    if config.extra.get(QUANT_CONFIG_KEY) is not None:
        return "stored"
    return "thudm" if _thudm_bits(config) else None


def _thudm_bits(config: AnyConfig) -> int:
    bits = getattr(config, "quantization_bit", None)
    if bits is None:
        bits = config.extra.get("quantization_bit", 0)
    return int(bits or 0)


class QuantizedLoader:
    """Fills the quantized modules of a meta-built model from checkpoint tensors, one tensor at a time.

    ``mode``: "quantize" (float weights quantized on arrival), "stored" (our format) or "thudm".
    """

    def __init__(self, modules: dict[str, Int8Linear | Int4Linear], mode: str, keymap: KeyMap,
                 dtype: torch.dtype | None, device: torch.device, symmetric: bool = False,
                 tensor_hook: TensorHook | None = None) -> None:
        self.modules, self.mode, self.keymap, self.tensor_hook = modules, mode, keymap, tensor_hook
        self.dtype, self.device, self.symmetric = dtype, device, symmetric
        bits = 8 if modules and quantized_bits(next(iter(modules.values()))) == 8 else 4
        tensors = {"quantize": ("weight",), "thudm": ("weight", "weight_scale"),
                   "stored": ("weight", "scale") if bits == 8 else ("qweight", "scales_and_zeros")}[mode]
        self.expected = {f"{name}.{t}" for name, m in modules.items()
                         for t in (*tensors, *(("bias",) if m.bias is not None else ()))}
        self.loaded: set[str] = set()
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, path: Path | str, key: str, tensor: torch.Tensor) -> bool:
        """Consume ``key`` if it belongs to a quantized module (True), else leave it to the caller."""
        try:
            name = map_module_key(key, self.keymap)
        except UnknownKeyError:
            return False
        if name is None:
            return False
        module_name, _, suffix = name.rpartition(".")
        module = self.modules.get(module_name)
        if module is None or name not in self.expected:
            return False
        if name in self.loaded:
            raise CheckpointError(f"{path}: {key} appears twice in the checkpoint")
        if self.tensor_hook is not None and suffix in ("weight", "bias"):
            tensor = self.tensor_hook(name, tensor)  # e.g. this tensor-parallel rank's slice
        try:
            self._take(module_name, module, suffix, tensor)
        except ValueError as exc:
            # A pair of tensors is checked together, when the second arrives: name their module.
            paired = suffix != "bias" and (self.mode == "thudm" or isinstance(module, Int4Linear)) \
                and self.mode != "quantize"
            raise CheckpointError(f"{path}: {key.rpartition('.')[0] if paired else key}: {exc}") from None
        self.loaded.add(name)
        if suffix != "bias":  # the temporaries of quantizing / repacking one weight were just freed
            release_freed_memory()
        return True

    def _take(self, module_name: str, module: Int8Linear | Int4Linear, suffix: str, tensor: torch.Tensor) -> None:
        if suffix == "bias":
            _check_shape(tensor, (module.out_features,))
            cast = self.dtype if tensor.is_floating_point() else None
            module.bias = tensor.to(device=self.device, dtype=cast)
            return
        if self.mode == "quantize":
            _check_shape(tensor, (module.out_features, module.in_features))
            if not tensor.is_floating_point():
                raise ValueError(f"expected a float weight to quantize, found {tensor.dtype}")
            # Cast to the load dtype first, exactly as load-then-quantize sees the weight.
            weight = tensor.to(device=self.device, dtype=self.dtype)
            if isinstance(module, Int8Linear):
                module.quantize_(weight)
            else:
                module.quantize_(weight, symmetric=self.symmetric)
            return
        if self.mode == "stored" and isinstance(module, Int8Linear):
            if suffix == "weight":
                _check(tensor, torch.int8, (module.out_features, module.in_features))
                module.weight = _owned(tensor, self.device)
            else:
                _check_shape(tensor, (module.out_features,))
                module.scale = _owned(tensor.float(), self.device)
            return
        # The rest needs a pair of tensors: keep the first until the second arrives (one module's worth).
        pending = self._pending.setdefault(module_name, {})
        pending[suffix] = tensor
        pair = ("qweight", "scales_and_zeros") if self.mode == "stored" else ("weight", "weight_scale")
        if not all(p in pending for p in pair):
            return
        first, second = (pending[p].to(self.device) for p in pair)
        del self._pending[module_name]
        if self.mode == "stored":
            module.load_portable_(first, second)
        elif isinstance(module, Int4Linear):
            module.load_thudm_(first, second)
        else:
            _check(first, torch.int8, (module.out_features, module.in_features))
            _check_shape(second, (module.out_features,))
            module.weight, module.scale = _owned(first, self.device), _owned(second.float(), self.device)

    def missing(self) -> list[str]:
        return sorted(self.expected - self.loaded)


def _owned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy in freshly allocated memory. Tensors read from a safetensors file sit at arbitrary byte offsets
    of the mapping, and PyTorch's int8 weight-only kernel crashes on a weight that is not aligned."""
    moved = tensor.to(device)
    return moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"shape {tuple(tensor.shape)}, expected {shape}")


def _check(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype:
        raise ValueError(f"dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                         f"{str(dtype).removeprefix('torch.')}")
    _check_shape(tensor, shape)


def prepare_quantized_load(model: nn.Module, config: AnyConfig, quantize: int | str | None, keymap: KeyMap,
                           dtype: torch.dtype | None, device: torch.device, where: Path | str,
                           symmetric: bool = False, tensor_hook: TensorHook | None = None,
                           group_size: int = DEFAULT_GROUP_SIZE, also: tuple[str, ...] = ()
                           ) -> QuantizedLoader | None:
    """Swap ``model``'s (meta) linears for empty quantized modules as the checkpoint or ``quantize`` asks,
    and return the loader that fills them (None when nothing is quantized). Sets ``model.quantization``."""
    stored = config.extra.get(QUANT_CONFIG_KEY)
    thudm = _thudm_bits(config)
    requested = None if quantize is None else quantize_bits(quantize)
    config_file = Path(where) / "config.json"
    if stored is not None:
        if thudm:
            raise CheckpointError(f"{config_file}: both quantization_bit ({thudm}) and {QUANT_CONFIG_KEY} are "
                                  "set; a checkpoint is in one quantized format")
        bits, plan = _stored_plan(model, stored, config_file)
        mode, info = "stored", {k: v for k, v in stored.items() if k in ("group_size", "symmetric", "skip", "source")}
    elif thudm:
        bits, plan = _thudm_plan(model, config, thudm, config_file)
        mode, info = "thudm", {"source": f"THUDM int{bits}"}
    elif requested is not None:
        bits, skip = requested, family_spec(config).quant_skip_patterns(also)
        if bits == 4 and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
        plan = plan_quantization(model, bits, group_size=group_size, skip=skip)
        mode = "quantize"
        info = quantization_plan_info(bits, skip, group_size, symmetric)
    else:
        return None
    if requested is not None and requested != bits:
        raise CheckpointError(f"{where} is already quantized to int{bits}; load it without quantize={quantize!r} "
                              f"(re-quantizing int{bits} weights to int{requested} is not supported)")
    modules = swap_empty(model, plan, bits, dtype)
    model.quantization = {"bits": bits, **info}
    return QuantizedLoader(modules, mode, keymap, dtype, device, symmetric, tensor_hook)


def _stored_plan(model: nn.Module, entry: object, config_file: Path) -> tuple[int, dict[str, int | None]]:
    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{config_file}: {QUANT_CONFIG_KEY}: {message}")

    if not isinstance(entry, dict):
        raise bad("expected an object")
    if entry.get("quant_method") != QUANT_METHOD:
        raise bad(f"quant_method {entry.get('quant_method')!r} is not supported (only {QUANT_METHOD!r})")
    version = entry.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise bad(f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise bad(f"format_version {version} is newer than this visualglm reads ({FORMAT_VERSION}); upgrade")
    bits = entry.get("bits")
    if bits not in (4, 8):
        raise bad(f"bits must be 4 or 8, got {bits!r}")
    names = entry.get("modules")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("modules must be a non-empty list of module names")
    group_size = entry.get("group_size")
    overrides = entry.get("group_size_overrides", {}) or {}
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise bad(f"group_size {group_size!r} is not one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if not isinstance(overrides, dict):
        raise bad("group_size_overrides must be an object")
    plan: dict[str, int | None] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise bad(f"module {name!r} does not exist in this model") from None
        weight = getattr(module, "weight", None)
        if getattr(weight, "ndim", 0) != 2:
            raise bad(f"module {name!r} is not a linear layer")
        if bits == 8:
            plan[name] = None
            continue
        g = overrides.get(name, group_size)
        if g not in INT4_GROUP_SIZES or weight.shape[1] % g:
            raise bad(f"group size {g!r} does not fit {name!r} (in_features {weight.shape[1]})")
        plan[name] = g
    return bits, plan


def _thudm_plan(model: nn.Module, config: AnyConfig, bits: int, config_file: Path
                ) -> tuple[int, dict[str, int | None]]:
    if bits not in (4, 8):
        raise CheckpointError(f"{config_file}: quantization_bit {bits} is not supported (4 or 8)")
    if not family_spec(config).thudm_quantized:
        raise CheckpointError(f"{config_file}: quantization_bit is set, but pre-quantized checkpoints are only "
                              "read for ChatGLM-6B / VisualGLM-6B")
    if config.extra.get("quantization_embeddings"):
        raise CheckpointError(f"{config_file}: quantized embeddings (quantization_embeddings) are not supported")
    matches: Callable[[str], bool] = lambda n: any(fnmatch.fnmatchcase(n, p) for p in THUDM_QUANTIZED)  # noqa: E731
    plan: dict[str, int | None] = {}
    for name, module in model.named_modules():
        if name and matches(name):
            plan[name] = None if bits == 8 else Int4Linear.pick_group_size(module.weight.shape[1], 256)
    return bits, plan
