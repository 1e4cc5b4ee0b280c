"""The portable ``Int8Linear`` state_dict for INT8 modules that keep their weight in a kernel's own layout.

``OneDNNInt8Linear`` and ``AmxInt8Linear`` hold the int8 weight packed for their kernel; they save and load
``Int8Linear``'s tensors (``weight`` int8 ``[out, in]``, ``scale`` fp32 ``[out]``, optional ``bias``), so a
checkpoint does not depend on the CPU that wrote it.
"""

from __future__ import annotations

from typing import Any

import torch


class PortableInt8State:
    """Mixin (before ``nn.Module`` in the bases): ``Int8Linear``'s state_dict keys and checks. The class
    provides ``int8_weight()`` (int8 ``[out, in]``) and ``_set_int8(weight, scale)`` (repack), and has
    ``in_features``, ``out_features``, ``scale`` and ``bias``."""

    in_features: int
    out_features: int
    scale: torch.Tensor
    bias: torch.Tensor | None

    def int8_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_int8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.int8_weight()
        destination[prefix + "scale"] = self.scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        names = ["weight", "scale"] + (["bias"] if self.bias is not None else [])
        absent = [prefix + name for name in names if prefix + name not in state_dict]
        missing_keys.extend(absent)
        if absent:
            return
        weight = state_dict[prefix + "weight"]
        if weight.dtype != torch.int8 or tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: expected int8 {(self.out_features, self.in_features)}, got "
                              f"{weight.dtype} {tuple(weight.shape)}")
            return
        self._set_int8(weight, state_dict[prefix + "scale"].float())
        if self.bias is not None:
            self.bias = state_dict[prefix + "bias"].detach().clone()
