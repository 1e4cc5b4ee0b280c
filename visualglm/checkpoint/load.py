"""Load an official checkpoint directory into our model classes.

Build on the meta device (no memory), then stream tensor by tensor from memory-mapped safetensors or
``torch.load(mmap=True, weights_only=True)`` pickles, cast to the target dtype/device, and assign. Peak
memory stays near the size of the loaded weights: when the stored dtype is already the target dtype on
CPU, the parameter *is* the memory-mapped file region (no copy at all).
"""

from __future__ import annotations

import ctypes
import functools
import json
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.keymaps import UnknownKeyError, map_key
from visualglm.config import AnyConfig, ConfigError, read_config
from visualglm.families import family_spec
from visualglm.quant.cuda_kernels import use_cuda_kernels
from visualglm.quant.swap import quantize_model

if TYPE_CHECKING:
    from visualglm.checkpoint.quantized import QuantizedLoader

# Weight file layouts of the HF format, in order of preference.
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ``(parameter name, checkpoint tensor) -> tensor to assign``, applied as each tensor is read.
TensorHook = Callable[[str, torch.Tensor], torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(sorted(_DTYPES))})")
    return _DTYPES[dtype]


def default_dtype(config: AnyConfig, device: torch.device) -> torch.dtype:
    """The checkpoint's own dtype, except float16 on CPU, which becomes bfloat16 (CPU fp16 math is slow
    and bf16 keeps fp16's values within its wider range), and bfloat16 on CUDA whatever the checkpoint
    stores (the GPU's fast format; ``dtype="float16"`` keeps ChatGLM-6B's and VisualGLM-6B's reference
    precision, ``"float32"`` full precision)."""
    dtype = _DTYPES.get(config.torch_dtype, torch.float32)
    if device.type == "cuda":
        return torch.bfloat16
    if dtype == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return dtype


def build_model(config: AnyConfig, device: torch.device | str = "meta") -> nn.Module:
    """An empty model of the config's family (on the meta device by default: no memory)."""
    cls = family_spec(config).model_class
    with torch.device(device):
        return cls(config)


def load(path_or_name: str | Path, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, fast_cpu_kernels: bool = True,
         qkv_layout: str = "auto", quantize: int | str | None = None,
         tensor_parallel: bool = False, quant_group_size: int = 128,
         quantize_also: tuple[str, ...] = ()) -> nn.Module:
    """Load a checkpoint directory, a known name or a hub id into an eval-mode model.

    Two directory layouts are read: the official Hugging Face one (``config.json`` + weights) and
    SwissArmyTransformer's (``model_config.json`` + ``latest`` + ``<iter>/mp_rank_XX_model_states.pt``,
    see ``visualglm.checkpoint.sat``; ``qkv_layout`` applies to it only).

    ``dtype`` defaults to the checkpoint's (float16 becomes bfloat16 on CPU); ``"stored"`` keeps every
    tensor's stored dtype (VisualGLM's HF checkpoint stores its image encoder in float32). The model has
    ``.config`` and ``.checkpoint_dir`` attributes; its parameters do not require grad. ``fast_cpu_kernels``
    swaps a CPU model's linears for the fastest kernels this CPU offers, chosen by rule at load time
    (``visualglm.checkpoint.cpu_kernels``: bf16 weights reordered once for oneDNN on AVX-512 BF16 CPUs, fp32
    GEMM for prefill on CPUs without bf16 math, oneDNN's int8 matmul on AMX); the results stay those of the
    plain kernels to rounding. ``quantize`` 8/"int8" or 4/"int4" replaces the language model's
    linears with weight-only INT8 / INT4 (groups of ``quant_group_size``) ones while loading: each weight
    is quantized as it is read, so the full-precision model is never in memory (``visualglm.models.plans``
    says what stays in floating point; ``quantize_also`` adds optional parts: ``"vision"`` for the image
    encoder, ``"output"`` for the output layer: quantized by the plan in GLM-4V-9B, an INT8 copy for the
    logits where it is tied to the embeddings). Quantized checkpoints (``visualglm.checkpoint.quantized``:
    ours, or THUDM's ``quantization_bit`` 4/8 layout) load as stored, with no ``quantize`` needed.
    ``tensor_parallel`` (under an initialized process group, e.g. torchrun) keeps only this rank's shard,
    read slice by slice from the checkpoint (``visualglm.distributed.tp``); quantization then applies to
    the shard.
    """
    device = check_device(device)
    directory = resolve_checkpoint_dir(path_or_name)
    if is_sat_directory(directory):
        from visualglm.checkpoint.sat import load_sat

        model = load_sat(directory, dtype=dtype, device=device, qkv_layout=qkv_layout, progress=progress,
                         fast_cpu_kernels=False)
        if tensor_parallel:  # sat weights are already loaded: slice them in place
            from visualglm.distributed.tp import apply_tensor_parallel

            apply_tensor_parallel(model)
        if quantize is not None:
            apply_quantization(model, quantize, quant_group_size, quantize_also)
        copy_tied_output(model, quantize_also)
        if fast_cpu_kernels:
            apply_cpu_kernels(model)
        apply_cuda_kernels(model)
        return model
    if qkv_layout != "auto":
        raise ValueError(f"qkv_layout={qkv_layout!r} applies to sat checkpoints only; {directory} is in the "
                         "Hugging Face layout, whose QKV rows are always per-head interleaved")
    config = read_checkpoint_config(directory)
    target_dtype = target_dtype_for(dtype, config, device)
    model = build_model(config)
    from visualglm.checkpoint.quantized import prepare_quantized_load, prequantized_format

    # A pre-quantized checkpoint is split after loading (its packed tensors cannot be sliced as they stream).
    split_after = tensor_parallel and prequantized_format(config) is not None
    tensor_hook = None
    if tensor_parallel and not split_after:  # resize the meta model to this rank's shard; the hook slices
        from visualglm.distributed.tp import apply_tensor_parallel  # each tensor read

        tensor_hook = apply_tensor_parallel(model)
    keymap = family_spec(config).keymap("hf")
    # Quantized linears are swapped in on the meta model and filled (quantized) tensor by tensor.
    quant = prepare_quantized_load(model, config, quantize, keymap, target_dtype, device, directory,
                                   tensor_hook=tensor_hook, group_size=quant_group_size, also=quantize_also)
    load_weights(model, weight_files(directory), keymap, target_dtype, device, progress, tensor_hook=tensor_hook,
                 quant=quant)
    model.config = config
    model.checkpoint_dir = directory
    if split_after:
        from visualglm.distributed.tp import apply_tensor_parallel

        apply_tensor_parallel(model)
    copy_tied_output(model, quantize_also)
    if fast_cpu_kernels:
        apply_cpu_kernels(model)
    apply_cuda_kernels(model)
    return model.eval()


def quantize_bits(quantize: int | str) -> int:
    bits = {8: 8, 4: 4, "8": 8, "4": 4, "int8": 8, "int4": 4}.get(quantize)
    if bits is None:
        raise ValueError(f"quantize must be 8, 4, 'int8' or 'int4', got {quantize!r}")
    return bits


def quantization_plan_info(bits: int, skip: tuple[str, ...], group_size: int, symmetric: bool = False
                           ) -> dict:
    """How a model was quantized, as ``model.quantization`` records it (and config.json stores it)."""
    return {"symmetric": symmetric, "skip": list(skip), **({"group_size": group_size} if bits == 4 else {})}


def apply_quantization(model: nn.Module, quantize: int | str, group_size: int = 128,
                       also: tuple[str, ...] = ()) -> int:
    """Weight-only quantization of a loaded model following its family's plan (plus the optional parts in
    ``also``, see ``FamilySpec.quant_optional``); returns modules replaced."""
    bits, skip = quantize_bits(quantize), family_spec(model).quant_skip_patterns(also)
    model.quantization = {"bits": bits, **quantization_plan_info(bits, skip, group_size)}
    return quantize_model(model, bits, group_size=group_size, skip=skip)


def check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' requested but CUDA is not available on this machine")
    return device


def target_dtype_for(dtype: str | torch.dtype | None, config: AnyConfig, device: torch.device
                     ) -> torch.dtype | None:
    """The dtype to load into: explicit, the checkpoint's default, or None for ``"stored"`` (keep each
    tensor's stored dtype)."""
    if dtype == "stored":
        return None
    return parse_dtype(dtype) or default_dtype(config, device)


def is_sat_directory(directory: Path) -> bool:
    """A SwissArmyTransformer checkpoint: ``model_config.json`` and no HF ``config.json``."""
    return (directory / "model_config.json").is_file() and not (directory / "config.json").is_file()


def apply_cpu_kernels(model: nn.Module) -> dict[str, int]:
    """Swap a loaded CPU model's linears for the fastest kernels this CPU offers (chosen by rule, see
    ``visualglm.checkpoint.cpu_kernels``); returns how many of each kind were swapped. A no-op elsewhere."""
    from visualglm.checkpoint.cpu_kernels import apply_cpu_kernels as apply

    return apply(model)


def copy_tied_output(model: nn.Module, also: tuple[str, ...]) -> bool:
    """With ``"output"`` in ``also``, give an output layer tied to the embeddings (ChatGLM-6B, VisualGLM-6B)
    a private INT8 copy for the logits (``visualglm.quant.output``, +0.53 GB at full size); untied ones are
    quantized by the plan instead. Returns whether a copy was made."""
    from visualglm.quant.output import quantize_tied_output

    return "output" in also and quantize_tied_output(model)


def apply_cuda_kernels(model: nn.Module) -> dict[str, int]:
    """Run the quantized linears that sit on a CUDA device on PyTorch's CUDA kernels (INT8, INT4 tinygemm;
    ``visualglm.quant.cuda_kernels``): one module at a time, on the GPU. A no-op elsewhere."""
    return use_cuda_kernels(model)


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
    for index_name in _INDEX_FILES:
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
    for single in _SINGLE_FILES:
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(_INDEX_FILES + _SINGLE_FILES)}")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file, memory-mapped (CPU tensors)."""
    if path.suffix == ".safetensors":
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
        return
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor


def _torch_load(path: Path) -> object:
    """``torch.load`` that only accepts tensors and never runs code from the file."""
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


def load_weights(model: nn.Module, files: list[Path], keymap: dict, dtype: torch.dtype | None,
                 device: torch.device, progress: bool = True, tensor_hook: TensorHook | None = None,
                 quant: QuantizedLoader | None = None) -> None:
    """Assign every tensor of ``files`` to ``model`` (built on meta) with strict key and shape checks."""
    tensors = ((path, key, tensor) for path in files for key, tensor in iter_tensors(path))
    assign_weights(model, tensors, keymap, dtype, device, progress, where=files[0].parent,
                   tensor_hook=tensor_hook, quant=quant)


def assign_weights(model: nn.Module, tensors: Iterable[tuple[Path | str, str, torch.Tensor]], keymap: dict,
                   dtype: torch.dtype | None, device: torch.device, progress: bool = True,
                   where: Path | str = "", tensor_hook: TensorHook | None = None,
                   quant: QuantizedLoader | None = None) -> None:
    """Assign ``(source, key, tensor)`` triples to ``model`` (built on meta): keys are mapped through
    ``keymap``, every parameter must be set exactly once with the right shape. ``source`` names the file in
    errors; ``dtype`` None keeps the stored dtype. ``tensor_hook(name, tensor)`` may replace each tensor
    (still memory-mapped) before its shape is checked, e.g. by the slice a tensor-parallel rank holds.
    ``quant`` takes the tensors of quantized modules (``visualglm.checkpoint.quantized``)."""
    tied = model.tied_parameters() if hasattr(model, "tied_parameters") else {}
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
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_preview(sorted(unexpected))}")
        raise CheckpointError(f"checkpoint does not match the model ({where}): " + "; ".join(parts))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    release_freed_memory()


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


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
