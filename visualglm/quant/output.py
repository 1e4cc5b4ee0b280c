"""An INT8 copy of an output layer whose weight is tied to the input embeddings.

ChatGLM-6B's and VisualGLM-6B's output layer *is* the word-embedding matrix (130528 x 4096, 1.07 GB in
bf16): with the transformer in INT4 it is about a quarter of the bytes a decode step reads. Quantizing the
shared matrix in place would quantize the embedding lookup too, so ``TiedInt8Output`` keeps the float
weight (still the embedding's, still what ``state_dict`` and ``tie_weights`` see) and adds a private INT8
copy (per-row scales, 0.53 GB) that only the logits read. Memory: +0.53 GB next to the float matrix, which
the lookup still needs (when it is memory-mapped from the checkpoint only the rows looked up are read).

INT8 rather than INT4: on the CPUs measured the INT4 kernel streams half the bytes at about half the speed
(``benchmarks/quant_linear.py``), so an INT4 copy would cost the same time for more error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant.linear import Int8Linear


class TiedInt8Output(nn.Module):
    """``y = x @ W.T`` computed from an INT8 copy of ``W`` (CPU, no input gradient), else from ``W``.

    ``weight``: the shared float parameter ``[vocab, hidden]``; ``kernel``: the INT8 module (an
    ``Int8Linear`` or a faster equivalent, see ``visualglm.checkpoint.cpu_kernels``), held outside the
    module tree so that it is never saved, loaded or counted as a parameter.
    """

    def __init__(self, linear: nn.Module, make_kernel: Callable[[Int8Linear], nn.Module] | None = None) -> None:
        super().__init__()
        weight = linear.weight
        if weight.ndim != 2 or getattr(linear, "bias", None) is not None:
            raise ValueError("expected a bias-free linear layer with a 2-D weight")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        kernel = Int8Linear.from_linear(linear)
        self._kernel = [make_kernel(kernel) if make_kernel is not None else kernel]  # a list: not a submodule

    @property
    def kernel(self) -> nn.Module:
        return self._kernel[0]

    def set_kernel(self, module: nn.Module) -> None:
        self._kernel[0] = module

    def weight_nbytes(self) -> int:
        """Bytes a forward reads: the INT8 copy and its scales (the float weight is only looked up)."""
        return self.out_features * self.in_features + self.out_features * 4

    def extra_nbytes(self) -> int:
        """Memory this module adds beside the shared float weight."""
        return self.weight_nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight.to(x.dtype))
        return self.kernel(x)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        if fn(torch.zeros(1)).device.type != "cpu":
            raise RuntimeError("a model with an INT8 copy of its tied output layer cannot move to another "
                               "device: load it without quantize_also=('output',) for that")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 copy"


def output_is_tied(model: nn.Module) -> bool:
    """True when ``model``'s output layer shares its weight with the input embeddings."""
    out = getattr(model, "lm_head", None)
    return out is not None and getattr(out, "weight", None) is model.get_input_embeddings().weight


def quantize_tied_output(model: nn.Module) -> bool:
    """Give a tied ``lm_head`` an INT8 copy (``TiedInt8Output``); returns False when there is nothing to do
    (untied output layers are quantized by the ordinary plan, ``quantize_also=("output",)``)."""
    if isinstance(getattr(model, "lm_head", None), TiedInt8Output) or not output_is_tied(model):
        return False
    with torch.no_grad():
        model.lm_head = TiedInt8Output(model.lm_head)
    return True
