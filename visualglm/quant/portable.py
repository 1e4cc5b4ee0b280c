"""The portable ``state_dict`` of quantized linears whose weights live in a kernel's own layout.

``Int4Linear`` (its CPU layout depends on the CPU), ``OneDNNInt8Linear``, ``AmxInt8Linear`` and
``AmxInt4Linear`` save and load one CPU-independent form (``Int8Linear``'s ``weight``/``scale``,
``Int4Linear``'s plain ``qweight``/``scales_and_zeros``), so a checkpoint does not depend on the CPU or the
kernel that wrote it.
"""

from __future__ import annotations

from typing import Any

import torch


class PortableState:
    """Mixin (before ``nn.Module`` in the bases): the state_dict is ``portable_keys`` named after the tensors
    ``portable_state()`` returns, read back by ``load_portable_(*tensors)`` (which raises ValueError with the
    reason when they do not fit), plus the ``bias`` when the module has one."""

    portable_keys: tuple[str, ...]
    bias: torch.Tensor | None

    def portable_state(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def load_portable_(self, *tensors: torch.Tensor) -> Any:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key, tensor in zip(self.portable_keys, self.portable_state(), strict=True):
            destination[prefix + key] = tensor
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        names = [*self.portable_keys, *(["bias"] if self.bias is not None else [])]
        absent = [prefix + name for name in names if prefix + name not in state_dict]
        missing_keys.extend(absent)
        if absent:
            return
        try:
            self.load_portable_(*(state_dict[prefix + key] for key in self.portable_keys))
        except ValueError as exc:
            error_msgs.append(f"{prefix}: {exc}")
            return
        if self.bias is not None:
            self.bias = state_dict[prefix + "bias"].detach().clone()


def check_int8_state(weight: torch.Tensor, scale: torch.Tensor, out_features: int | None = None,
                     in_features: int | None = None) -> None:
    """Raise ValueError unless ``weight`` is int8 ``[out, in]`` and ``scale`` ``[out]`` (``Int8Linear``'s
    tensors); ``out_features``/``in_features``, when given, must be the weight's shape."""
    shape = tuple(weight.shape)
    expected = shape if out_features is None else (out_features, in_features)
    if weight.dtype != torch.int8 or weight.ndim != 2 or shape != expected or tuple(scale.shape) != shape[:1]:
        raise ValueError(f"expected int8 [out, in] weight{'' if out_features is None else f' {expected}'} and "
                         f"[out] scale, got {weight.dtype} {shape} and {tuple(scale.shape)}")


class PortableInt8State(PortableState):
    """``Int8Linear``'s state_dict (``weight`` int8 ``[out, in]``, ``scale`` fp32 ``[out]``) for a module that
    provides ``int8_weight()`` and repacks in ``_set_int8(weight, scale)``."""

    portable_keys = ("weight", "scale")
    in_features: int
    out_features: int
    scale: torch.Tensor

    def int8_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_int8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        raise NotImplementedError

    def portable_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.int8_weight(), self.scale

    def load_portable_(self, weight: torch.Tensor, scale: torch.Tensor) -> PortableInt8State:
        check_int8_state(weight, scale, self.out_features, self.in_features)
        self._set_int8(weight, scale.float())
        return self
