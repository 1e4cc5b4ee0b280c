"""The low-level pieces every checkpoint reader shares: errors, dtypes, weight files, tensor assignment.

This module sits below every other module of ``visualglm.checkpoint`` (it imports none of them), so the
readers (``load`` for the Hugging Face layout, ``sat``, ``quantized``) and the tools built on them
(``inspect``, ``tiny``, ``convert``) depend on it and never on each other in a circle.

Weights are streamed: a model is built on the meta device (no memory), then every tensor, memory-mapped
from safetensors or from a ``torch.load(mmap=True, weights_only=True)`` pickle, is cast to the target
dtype/device and assigned. When the stored dtype is already the target dtype on CPU, the parameter *is* the
memory-mapped file region (no copy at all).
"""

from __future__ import annotations

import ctypes
import functools
import json
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from visualglm.checkpoint.keymaps import KeyMap, UnknownKeyError, map_key
from visualglm.config import AnyConfig, ConfigError, read_config
from visualglm.families import family_spec

__all__ = [
    "CheckpointError", "TensorConsumer", "TensorHook", "assign_weights", "build_model", "check_device",
    "default_dtype", "is_sat_directory", "iter_tensors", "parse_dtype", "preview", "read_checkpoint_config",
    "release_freed_memory", "safe_torch_load", "target_dtype_for", "weight_files",
]

# Weight file layouts of the HF format, in order of preference.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# ``(parameter name, checkpoint tensor) -> tensor to assign``, applied as each tensor is read.
TensorHook = Callable[[str, torch.Tensor], torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class TensorConsumer(Protocol):
    """Takes some checkpoint tensors before ``assign_weights`` sees them (the quantized loader of
    ``visualglm.checkpoint.quantized``: it turns the weights of quantized modules into their buffers)."""

    expected: set[str]  # the parameter/buffer names it fills

    def take(self, path: Path | str, key: str, tensor: torch.Tensor) -> bool:
        """Consume ``key`` (True) or leave it to the caller (False)."""

    def missing(self) -> list[str]:
        """The expected names that no tensor has filled."""


# ---- dtypes and devices -------------------------------------------------------------------------------------
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(sorted(DTYPES))})")
    return DTYPES[dtype]


def default_dtype(config: AnyConfig, device: torch.device) -> torch.dtype:
    """The checkpoint's own dtype, except float16 on CPU, which becomes bfloat16 (CPU fp16 math is slow
    and bf16 keeps fp16's values within its wider range), and bfloat16 on CUDA whatever the checkpoint
    stores (the GPU's fast format; ``dtype="float16"`` keeps ChatGLM-6B's and VisualGLM-6B's reference
    precision, ``"float32"`` full precision)."""
    dtype = DTYPES.get(config.torch_dtype, torch.float32)
    if device.type == "cuda":
        return torch.bfloat16
    if dtype == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return dtype


def target_dtype_for(dtype: str | torch.dtype | None, config: AnyConfig, device: torch.device
                     ) -> torch.dtype | None:
    """The dtype to load into: explicit, the checkpoint's default, or None for ``"stored"`` (keep each
    tensor's stored dtype)."""
    if dtype == "stored":
        return None
    return parse_dtype(dtype) or default_dtype(config, device)


def check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but CUDA is not available on this machine")
    return device


def build_model(config: AnyConfig, device: torch.device | str = "meta") -> nn.Module:
    """An empty model of the config's family (on the meta device by default: no memory)."""
    cls = family_spec(config).model_class
    with torch.device(device):
        return cls(config)


# ---- checkpoint directories and weight files ------------------------------------------------------------------
def is_sat_directory(directory: Path) -> bool:
    """A SwissArmyTransformer checkpoint: ``model_config.json`` and no HF ``config.json``."""
    return (directory / "model_config.json").is_file() and not (directory / "config.json").is_file()


def read_checkpoint_config(directory: Path) -> AnyConfig:
    """The config of a checkpoint directory; errors name the directory or the file."""
    try:
        return read_config(directory)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json: not a checkpoint directory") from None
    except ConfigError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from None


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory (sharded with an index, or a single file)."""
    for index_name in INDEX_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid shard index ({exc})") from None
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"{index_path} lists shard(s) that are missing: {', '.join(missing)}")
            return [directory / n for n in names]
    for single in SINGLE_FILES:
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(INDEX_FILES + SINGLE_FILES)}")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file, memory-mapped (CPU tensors)."""
    if path.suffix == ".safetensors":
        yield from _iter_safetensors(path)
        return
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # SafetensorError and OS errors: a truncated or corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    for key in keys:
        # One short-lived handle per tensor: a handle keeps every page it has touched mapped (and so
        # counted in RSS) until it closes, which costs up to a whole shard when tensors are converted.
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc})") from None
        yield key, tensor


def safe_torch_load(path: Path) -> object:
    """``torch.load`` that only accepts tensors and never runs code from the file (memory-mapped when the
    file allows it)."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # old (non-zip) pickles cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors, which could run "
            f"code when loaded ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from None


# ---- assigning tensors to a meta-built model ----------------------------------------------------------------
def assign_weights(model: nn.Module, tensors: Iterable[tuple[Path | str, str, torch.Tensor]], keymap: KeyMap,
                   dtype: torch.dtype | None, device: torch.device, progress: bool = True,
                   where: Path | str = "", tensor_hook: TensorHook | None = None,
                   quant: TensorConsumer | None = None) -> None:
    """Assign ``(source, key, tensor)`` triples to ``model`` (built on meta): keys are mapped through
    ``keymap``, every parameter must be set exactly once with the right shape. ``source`` names the file in
    errors; ``dtype`` None keeps the stored dtype. ``tensor_hook(name, tensor)`` may replace each tensor
    (still memory-mapped) before its shape is checked, e.g. by the slice a tensor-parallel rank holds.
    ``quant`` takes the tensors of quantized modules (``visualglm.checkpoint.quantized``)."""
    tied = model.tied_parameters()
    expected = {name: p for name, p in model.named_parameters(remove_duplicate=False) if name not in tied}
    loaded: set[str] = set()
    unexpected: list[str] = []
    total = len(expected) + (len(quant.expected) if quant is not None else 0)
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    for path, key, tensor in tensors:
        if quant is not None and quant.take(path, key, tensor):
            bar.update(1)
            continue
        try:
            name = map_key(key, keymap)
        except UnknownKeyError:
            unexpected.append(key)
            continue
        if name is None or name in tied:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        param = expected[name]
        if tensor_hook is not None:
            tensor = tensor_hook(name, tensor)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(param.shape)}")
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        _assign(model, name, tensor.to(device=device, dtype=cast))
        loaded.add(name)
        bar.update(1)
    bar.close()
    missing = sorted(set(expected) - loaded) + (quant.missing() if quant is not None else [])
    _check_complete(missing, unexpected, where)
    model.tie_weights()
    release_freed_memory()


def _check_complete(missing: list[str], unexpected: list[str], where: Path | str) -> None:
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {preview(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {preview(sorted(unexpected))}")
    raise CheckpointError(f"checkpoint does not match the model ({where}): " + "; ".join(parts))


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def preview(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are (for error messages)."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---- memory ---------------------------------------------------------------------------------------------------
@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only; musl and others lack it
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Hand memory that was freed but kept by the C allocator back to the system (glibc ``malloc_trim``;
    a no-op elsewhere). Quantizing while loading frees tens of MB of temporaries per weight between the
    quantized buffers it keeps; glibc keeps such holes in its heap, which measured up to ~1 GiB of RSS
    after loading full-size VisualGLM-6B (see ``benchmarks/load_memory.py``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
