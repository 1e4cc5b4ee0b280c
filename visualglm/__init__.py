"""VisualGLM: exact, fast PyTorch runtime for ChatGLM-6B, VisualGLM-6B and GLM-4V-9B.

Public API::

    import visualglm
    model = visualglm.load("path/to/chatglm-6b", dtype="bfloat16")
    tokenizer = visualglm.load_tokenizer("path/to/chatglm-6b")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "load_tokenizer", "__version__"]

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn


def load(path_or_name: str | Path, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, fast_cpu_kernels: bool = True,
         qkv_layout: str = "auto", quantize: int | str | None = None,
         tensor_parallel: bool = False, quant_group_size: int = 128,
         quantize_also: tuple[str, ...] = ()) -> nn.Module:
    """Load a checkpoint directory, a known name or a hub id into an eval-mode model (HF or sat layout,
    float or quantized). The arguments are those of ``visualglm.checkpoint.load.load``, which documents
    them and the order of the load-time transforms:

    - ``dtype``: the checkpoint's by default (float16 becomes bfloat16 on CPU; CUDA loads bfloat16);
      ``"stored"`` keeps every tensor's stored dtype;
    - ``device``: where the weights go;
    - ``progress``: a progress bar while reading;
    - ``fast_cpu_kernels``: the fastest CPU kernels this machine offers (same results to rounding);
    - ``qkv_layout``: a sat checkpoint's QKV row order ("auto", "contiguous", "interleaved");
    - ``quantize``: 8/"int8" or 4/"int4" weight-only quantization while loading;
    - ``tensor_parallel``: keep this rank's shard (under an initialized process group);
    - ``quant_group_size``: input columns per INT4 scale;
    - ``quantize_also``: optional parts to quantize too ("vision", "output").
    """
    from visualglm.checkpoint.load import load as _load

    return _load(path_or_name, dtype=dtype, device=device, progress=progress, fast_cpu_kernels=fast_cpu_kernels,
                 qkv_layout=qkv_layout, quantize=quantize, tensor_parallel=tensor_parallel,
                 quant_group_size=quant_group_size, quantize_also=quantize_also)


def load_tokenizer(path_or_name: str) -> Any:
    """Load the tokenizer stored in a checkpoint directory (or a known name / hub id)."""
    from visualglm.checkpoint.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path_or_name)
