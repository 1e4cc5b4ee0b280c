"""Load a checkpoint directory into our model classes, with the load-time transforms in one fixed order.

The readers live beside this module: the Hugging Face layout is streamed here (``load_weights``, on the
pieces of ``visualglm.checkpoint.io``), SwissArmyTransformer's in ``visualglm.checkpoint.sat``, quantized
checkpoints and quantize-while-loading in ``visualglm.checkpoint.quantized``. :func:`load` reads with one of
them and then applies the transforms in the order its docstring lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from visualglm.checkpoint.cpu_kernels import apply_cpu_kernels as swap_cpu_kernels
from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.io import (
    CheckpointError,
    TensorConsumer,
    TensorHook,
    assign_weights,
    build_model,
    check_device,
    default_dtype,
    is_sat_directory,
    iter_tensors,
    parse_dtype,
    read_checkpoint_config,
    release_freed_memory,
    target_dtype_for,
    weight_files,
)
from visualglm.checkpoint.keymaps import KeyMap
from visualglm.checkpoint.quantized import (
    prepare_quantized_load,
    prequantized_format,
    quantization_plan_info,
    quantize_bits,
)
from visualglm.checkpoint.sat import load_sat
from visualglm.distributed.tp import apply_tensor_parallel
from visualglm.families import family_spec
from visualglm.quant.cuda_kernels import use_cuda_kernels
from visualglm.quant.output import quantize_tied_output
from visualglm.quant.swap import quantize_model

# Defined in visualglm.checkpoint.io / .quantized; importable from here as before.
__all__ = [
    "CheckpointError", "apply_cpu_kernels", "apply_cuda_kernels", "apply_quantization", "build_model",
    "check_device", "copy_tied_output", "default_dtype", "is_sat_directory", "load", "load_weights",
    "parse_dtype", "quantization_plan_info", "quantize_bits", "read_checkpoint_config", "release_freed_memory",
    "target_dtype_for", "weight_files",
]


class _Remaining(NamedTuple):
    """The transforms of steps 2 and 3 that the reader left for :func:`load` to apply to the read model."""

    split: bool  # tensor parallelism: slice the read model to this rank's shard
    quantize: int | str | None  # weight-only quantization of the read model


def load(path_or_name: str | Path, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, fast_cpu_kernels: bool = True,
         qkv_layout: str = "auto", quantize: int | str | None = None,
         tensor_parallel: bool = False, quant_group_size: int = 128,
         quantize_also: tuple[str, ...] = ()) -> nn.Module:
    """Load a checkpoint directory, a known name or a hub id into an eval-mode model.

    Two directory layouts are read: the official Hugging Face one (``config.json`` + weights) and
    SwissArmyTransformer's (``model_config.json`` + ``latest`` + ``<iter>/mp_rank_XX_model_states.pt``,
    see ``visualglm.checkpoint.sat``; ``qkv_layout`` applies to it only).

    Arguments:

    - ``dtype``: defaults to the checkpoint's, except that float16 becomes bfloat16 on CPU and CUDA loads
      bfloat16 (``visualglm.checkpoint.io.default_dtype``); ``"stored"`` keeps every tensor's stored dtype
      (VisualGLM's HF checkpoint stores its image encoder in float32).
    - ``device``: where the weights go ("cpu", "cuda", ...).
    - ``progress``: a progress bar while the tensors are read.
    - ``fast_cpu_kernels``: swap a CPU model's linears for the fastest kernels this CPU offers, chosen by
      rule (``visualglm.checkpoint.cpu_kernels``: bf16 weights reordered once for oneDNN on AVX-512 BF16
      CPUs, fp32 GEMM for prefill on CPUs without bf16 math, oneDNN's int8 matmul on AMX); the results stay
      those of the plain kernels to rounding.
    - ``qkv_layout``: the QKV row order of a sat checkpoint ("auto", "contiguous", "interleaved"; see
      ``visualglm.checkpoint.sat.resolve_qkv_layout``).
    - ``quantize``: 8/"int8" or 4/"int4" replaces the language model's linears with weight-only INT8 / INT4
      ones (the family's ``FamilySpec.quant_skip`` says what stays in floating point).
    - ``tensor_parallel``: under an initialized process group (e.g. torchrun) keep only this rank's shard
      (``visualglm.distributed.tp``).
    - ``quant_group_size``: input columns per INT4 scale.
    - ``quantize_also``: optional parts quantized too (``FamilySpec.quant_optional``): ``"vision"`` for the
      image encoder, ``"output"`` for the output layer (quantized by the plan in GLM-4V-9B, an INT8 copy for
      the logits where it is tied to the embeddings).

    Quantized checkpoints (``visualglm.checkpoint.quantized``: ours, or THUDM's ``quantization_bit`` 4/8
    layout) load as stored, with no ``quantize`` needed. The model has ``.config`` and ``.checkpoint_dir``
    attributes; its parameters do not require grad.

    The order, the same for every layout:

    1. read: build the model on the meta device and assign the checkpoint's tensors (HF: streamed from
       memory-mapped files; sat: model-parallel ranks merged, QKV rows reordered, a head equal to the
       embedding tied to it);
    2. tensor parallelism: keep this rank's shard;
    3. quantization (``quantize``, ``quantize_also``), of the shard;
    4. the tied output layer's INT8 copy (``"output"`` in ``quantize_also``);
    5. CPU kernels (``fast_cpu_kernels``);
    6. CUDA kernels for the quantized linears on a GPU (``visualglm.quant.cuda_kernels``);
    7. eval mode.

    Where a step happens differs by layout, never its place in the order: for an HF float checkpoint
    steps 2 and 3 happen *during* step 1 (the meta model is resized to the shard, its planned linears are
    swapped for empty quantized ones, and each tensor is sliced and quantized as it is read, so the
    full-precision model is never in memory); a sat checkpoint is read whole, then sliced and quantized.
    One exception is load-bearing: a pre-quantized checkpoint is quantized as stored, so its quantization
    (3) comes with the read (1) and tensor parallelism (2) follows it, slicing the quantized modules (their
    packed tensors cannot be sliced as they stream).
    """
    device = check_device(device)
    directory = resolve_checkpoint_dir(path_or_name)
    if is_sat_directory(directory):
        model = load_sat(directory, dtype=dtype, device=device, qkv_layout=qkv_layout, progress=progress,
                         fast_cpu_kernels=False)
        remaining = _Remaining(split=tensor_parallel, quantize=quantize)
    else:
        if qkv_layout != "auto":
            raise ValueError(f"qkv_layout={qkv_layout!r} applies to sat checkpoints only; {directory} is in the "
                             "Hugging Face layout, whose QKV rows are always per-head interleaved")
        model, remaining = _read_hf(directory, dtype, device, progress, tensor_parallel, quantize,
                                    quant_group_size, quantize_also)
    if remaining.split:
        apply_tensor_parallel(model)
    if remaining.quantize is not None:
        apply_quantization(model, remaining.quantize, quant_group_size, quantize_also)
    copy_tied_output(model, quantize_also)
    if fast_cpu_kernels:
        apply_cpu_kernels(model)
    apply_cuda_kernels(model)
    return model.eval()


def _read_hf(directory: Path, dtype: str | torch.dtype | None, device: torch.device, progress: bool,
             tensor_parallel: bool, quantize: int | str | None, group_size: int, also: tuple[str, ...]
             ) -> tuple[nn.Module, _Remaining]:
    """Step 1 of :func:`load` for the HF layout, with steps 2 and 3 applied while streaming where they
    can be; returns the model and what is left (only a pre-quantized checkpoint's split)."""
    config = read_checkpoint_config(directory)
    target_dtype = target_dtype_for(dtype, config, device)
    model = build_model(config)
    # A pre-quantized checkpoint is split after loading (its packed tensors cannot be sliced as they stream).
    split_after = tensor_parallel and prequantized_format(config) is not None
    # Resize the meta model to this rank's shard; the hook slices each tensor read.
    tensor_hook = apply_tensor_parallel(model) if tensor_parallel and not split_after else None
    keymap = family_spec(config).keymap("hf")
    # Quantized linears are swapped in on the meta model and filled (quantized) tensor by tensor.
    quant = prepare_quantized_load(model, config, quantize, keymap, target_dtype, device, directory,
                                   tensor_hook=tensor_hook, group_size=group_size, also=also)
    load_weights(model, weight_files(directory), keymap, target_dtype, device, progress, tensor_hook=tensor_hook,
                 quant=quant)
    model.config = config
    model.checkpoint_dir = directory
    return model, _Remaining(split=split_after, quantize=None)


def load_weights(model: nn.Module, files: list[Path], keymap: KeyMap, dtype: torch.dtype | None,
                 device: torch.device, progress: bool = True, tensor_hook: TensorHook | None = None,
                 quant: TensorConsumer | None = None) -> None:
    """Assign every tensor of ``files`` to ``model`` (built on meta) with strict key and shape checks."""
    tensors = ((path, key, tensor) for path in files for key, tensor in iter_tensors(path))
    assign_weights(model, tensors, keymap, dtype, device, progress, where=files[0].parent,
                   tensor_hook=tensor_hook, quant=quant)


def apply_quantization(model: nn.Module, quantize: int | str, group_size: int = 128,
                       also: tuple[str, ...] = ()) -> int:
    """Weight-only quantization of a loaded model following its family's plan (plus the optional parts in
    ``also``, see ``FamilySpec.quant_optional``); returns modules replaced."""
    bits, skip = quantize_bits(quantize), family_spec(model).quant_skip_patterns(also)
    model.quantization = {"bits": bits, **quantization_plan_info(bits, skip, group_size)}
    return quantize_model(model, bits, group_size=group_size, skip=skip)


def apply_cpu_kernels(model: nn.Module) -> dict[str, int]:
    """Swap a loaded CPU model's linears for the fastest kernels this CPU offers (chosen by rule, see
    ``visualglm.checkpoint.cpu_kernels``); returns how many of each kind were swapped. A no-op elsewhere."""
    return swap_cpu_kernels(model)


def copy_tied_output(model: nn.Module, also: tuple[str, ...]) -> bool:
    """With ``"output"`` in ``also``, give an output layer tied to the embeddings (ChatGLM-6B, VisualGLM-6B)
    a private INT8 copy for the logits (``visualglm.quant.output``, +0.53 GB at full size); untied ones are
    quantized by the plan instead. Returns whether a copy was made."""
    return "output" in also and quantize_tied_output(model)


def apply_cuda_kernels(model: nn.Module) -> dict[str, int]:
    """Run the quantized linears that sit on a CUDA device on PyTorch's CUDA kernels (INT8, INT4 tinygemm;
    ``visualglm.quant.cuda_kernels``): one module at a time, on the GPU. A no-op elsewhere."""
    return use_cuda_kernels(model)
