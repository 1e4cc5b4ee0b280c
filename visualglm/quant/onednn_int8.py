"""INT8 linear on oneDNN's int8 x int8 matmul (AMX / VNNI), exact for floating-point activations.

PyTorch's weight-only kernel (``torch._weight_int8pack_mm``, what ``Int8Linear`` runs) streams an int8
weight about as fast as this CPU reads memory at batch 1, but costs ~2.5x as much at 8 rows. oneDNN's
quantized linear (``torch.ops.onednn.qlinear_pointwise`` on a weight reordered once by
``torch.ops.onednn.qlinear_prepack``) costs the same from 1 to 16 rows, but it multiplies int8 by int8:
the activations must be int8 too.

Activations are therefore split *exactly enough* into int8 planes (``split_planes``): per row,
``x = s * (q1 + q2 / 254 + q3 / 254**2) + r`` with ``s = max|x| / 127`` and ``|r| <= s / (2 * 254**2)``,
i.e. within ~6e-8 of the row's largest value, below fp32 rounding of the products. The planes are extra
rows of one matmul (a decode row becomes 3 rows, whose cost is the same), the int32 sums are exact, and the
planes are recombined in fp32. So ``planes=3`` computes what ``Int8Linear`` computes, to fp32 rounding, and
each row's result does not depend on the other rows of the batch.

``planes=1`` is dynamic activation quantization (one int8 plane per row): a different, less accurate
model, offered only as an explicit option (``visualglm.checkpoint.cpu_kernels``), with its error measured
by ``benchmarks/quant_accuracy.py``.

Measured on a 2-vCPU Intel Xeon (AVX-512, AMX-INT8), one 16384x4096 weight streamed from DRAM
(``.venv/bin/python -m benchmarks.quant_linear``): 2.6 ms from 1 to 16 rows, 3.5 ms at 24 rows
(batch 8 with 3 planes), against 2.75 ms at 1 row and 6.7 ms at 8 rows for ``_weight_int8pack_mm``.

The module keeps ``Int8Linear``'s state_dict (``weight`` int8 ``[out, in]``, ``scale``, ``bias``): the
reordered weight is turned back into the plain one exactly when saved or dequantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visualglm.quant.linear import Int8Linear
from visualglm.quant.portable import PortableInt8State, check_int8_state

PLANE_STEP = 254.0  # residual of a plane, in units of the next plane's scale: |r / (s / 254)| <= 127


def onednn_int8_available() -> bool:
    """True when this PyTorch build has oneDNN's quantized linear and this CPU has int8 dot-product units
    (VNNI or AMX). Without them oneDNN sums pairs of u8 x s8 products in saturating 16-bit lanes
    (``vpmaddubsw``): measured on an AVX2-only EPYC, a tiny INT8 model's logits moved by 12% of their range
    (1.34 on 11.6) against the weight-only kernel, so the path is refused there."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return False
    if not (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    try:
        packed = torch.ops.onednn.qlinear_prepack(torch.ones(16, 64, dtype=torch.int8), [1, 64])
        _qlinear(torch.ones(1, 64, dtype=torch.int8), packed, torch.ones(16), torch.zeros(16, dtype=torch.long))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def split_planes(x: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows ``[R, K]`` -> (int8 ``[planes * R, K]``: plane p's rows are ``p*R .. p*R + R - 1``,
    fp32 scales ``[planes, R, 1]``) with ``x ~= sum_p scale[p] * plane[p]`` (see the module docstring)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    t = x / scale
    out = torch.empty((planes, *x.shape), dtype=torch.int8, device=x.device)
    scales = [scale]
    for p in range(planes):
        q = t.round()
        if p == 0:
            q.clamp_(-127.0, 127.0)
        out[p] = q.to(torch.int8)
        if p + 1 < planes:
            t = (t - q).mul_(PLANE_STEP)  # in [-127, 127]
            scales.append(scales[-1] / PLANE_STEP)
    return out.view(planes * x.shape[0], x.shape[1]), torch.stack(scales)


def _qlinear(q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """int8 ``[R, K]`` x reordered int8 weight -> fp32 ``[R, N]`` = int32 sums times the per-row weight
    scale (activation scale 1, zero points 0)."""
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, scale, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


class OneDNNInt8Linear(PortableInt8State, nn.Module):
    """``Int8Linear`` (same weights, same results to fp32 rounding with ``planes=3``) on oneDNN's matmul.

    ``packed``: the int8 weight in oneDNN's layout (an opaque tensor, not a buffer); buffers ``scale`` fp32
    ``[out]`` and optional ``bias``. CPU only: moving the module elsewhere is refused with a message.
    """

    quant_bits = 8

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 planes: int = 3) -> None:
        super().__init__()
        check_int8_state(weight, scale)
        if planes not in (1, 2, 3):
            raise ValueError(f"planes must be 1, 2 or 3, got {planes}")
        self.out_features, self.in_features = weight.shape
        self.planes = planes
        self.packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), [1, self.in_features])
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("zeros", torch.zeros(self.out_features, dtype=torch.long), persistent=False)

    @classmethod
    def from_int8(cls, module: Int8Linear, planes: int = 3) -> OneDNNInt8Linear:
        return cls(module.weight, module.scale, module.bias, planes)

    def int8_weight(self) -> torch.Tensor:
        """The plain int8 weight ``[out, in]`` (exact: oneDNN's reorder is a permutation)."""
        return self.packed.to_dense().t().contiguous()

    def weight_nbytes(self) -> int:
        """Bytes of the reordered weight (not a parameter or buffer, so counted here)."""
        return self.out_features * self.in_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.int8_weight().to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            w = self.dequantize(x.dtype)  # a gradient w.r.t. the input: plain autograd, as Int8Linear
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        x2d = x.reshape(-1, self.in_features)
        rows = x2d.shape[0]
        q, scales = split_planes(x2d.float(), self.planes)
        out = _qlinear(q, self.packed, self.scale, self.zeros).view(self.planes, rows, self.out_features)
        y = out[0].mul_(scales[0])
        for p in range(1, self.planes):
            y.add_(out[p].mul_(scales[p]))
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # --- repacking for the plain Int8Linear state_dict (PortableInt8State), and no silent moves -----
    def _set_int8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), [1, self.in_features])
        self.scale = scale.clone()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        probe = fn(torch.zeros(1))
        if probe.device.type != "cpu":
            raise RuntimeError("a model with CPU decode kernels cannot move to another device: load it with "
                               "fast_cpu_kernels=False (or with device=...) instead")
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale  # dtype casts (model.half()) must not round the scales
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, planes={self.planes}")
