"""``CompatModel``: a loaded model with the reference remote code's methods (``chat``, ``stream_chat``,
``generate``, ``quantize``, VisualGLM's ``build_inputs_with_image``) and the ``nn.Module`` chains code
written for it uses (``.half().cuda()``, ``.to(device).eval()``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from visualglm.checkpoint.load import apply_quantization
from visualglm.compat import chat as family_chat
from visualglm.compat.encoding import BatchEncoding
from visualglm.compat.generate import generate
from visualglm.compat.tokenizer import refuse_extra, unwrap
from visualglm.config import image_size
from visualglm.families import FAMILIES, family_spec
from visualglm.generation.chat import model_undecodable_ranges
from visualglm.image import preprocess
from visualglm.quant.linear import quantized_bits


class CompatModel:
    """Wraps a model from ``visualglm.load``; ``.model`` is the model itself (what ``ChatSession`` takes)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._banned: tuple[tuple[int, int], ...] | None = None

    # ------------------------------------------------------------------ dtype / device chains
    def _apply(self, method: str, *args: Any, **kwargs: Any) -> CompatModel:
        """Run ``nn.Module.<method>``, keeping quantized layers' scales in their own dtype: a cast to fp16
        would round the INT8 scales and the INT4 kernels' bf16 scales/zeros."""
        quantized = [m for m in self.model.modules() if quantized_bits(m) is not None]
        kept = [(module, name, buffer) for module in quantized
                for name, buffer in module.named_buffers(recurse=False) if name != "bias"]
        getattr(self.model, method)(*args, **kwargs)
        for module, name, old in kept:
            new = getattr(module, name)
            if new.dtype != old.dtype:
                setattr(module, name, old.to(new.device))
        return self

    def half(self) -> CompatModel:
        return self._apply("half")

    def float(self) -> CompatModel:
        return self._apply("float")

    def bfloat16(self) -> CompatModel:
        return self._apply("bfloat16")

    def cuda(self, device: Any = None) -> CompatModel:
        if not torch.cuda.is_available():
            raise RuntimeError("model.cuda(): CUDA is not available on this machine (keep the model on the CPU)")
        return self._apply("cuda", device)

    def cpu(self) -> CompatModel:
        return self._apply("cpu")

    def to(self, *args: Any, **kwargs: Any) -> CompatModel:
        """``.to(device)``, ``.to(dtype)`` or both, like ``nn.Module.to``."""
        device = next((a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device, int))), None)
        if device is not None and torch.device(device if not isinstance(device, int) else f"cuda:{device}"
                                               ).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"model.to({device!r}): CUDA is not available on this machine")
        return self._apply("to", *args, **kwargs)

    def eval(self) -> CompatModel:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> CompatModel:
        if mode:
            raise ValueError("the compat model is for inference; fine-tune with `visualglm finetune` "
                             "(visualglm.finetune)")
        return self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.model.parameters(recurse)

    # ------------------------------------------------------------------ quantization
    def quantize(self, bits: int, **kwargs: Any) -> CompatModel:
        """Weight-only INT8 (``bits=8``) or INT4 (``bits=4``, groups of 128) quantization of the language
        model's linears, as the reference ``quantize(bits)``: the embeddings, the output layer and the image
        encoder stay in floating point (``visualglm.models.plans``). Chains: ``.quantize(8).half().cuda()``."""
        kwargs.pop("empty_init", None)  # the reference's loading detail; no effect here
        refuse_extra(kwargs, "quantize()")
        if bits not in (4, 8) or isinstance(bits, bool):
            raise ValueError(f"quantize(bits): bits must be 4 or 8, got {bits!r}")
        if getattr(self.model, "quantization", None):
            raise ValueError(f"the model is already quantized ({self.model.quantization['bits']}-bit)")
        apply_quantization(self.model, bits)
        return self

    # ------------------------------------------------------------------ chat
    def chat(self, tokenizer: Any, *args: Any, **kwargs: Any) -> tuple[str, list]:
        """The reference ``chat`` of the model's family (signatures in ``visualglm.compat.chat``)."""
        return family_chat.chat(self.model, tokenizer, *args, **kwargs)

    def stream_chat(self, tokenizer: Any, *args: Any, **kwargs: Any) -> Iterator[tuple[str, list]]:
        """The reference ``stream_chat``: yields ``(response so far, history)``; VisualGLM-6B takes the
        image path first, as its ``chat``."""
        return family_chat.stream_chat(self.model, tokenizer, *args, **kwargs)

    def build_inputs_with_image(self, tokenizer: Any, image_path: Any, query: str, history: list | None = None
                                ) -> BatchEncoding:
        """VisualGLM-6B's HF helper: ``input_ids`` ``[1, T]`` of its chat prompt with ``image_length``
        placeholders, ``pre_image_length`` (tokens before them) and ``images`` ``[1, 3, 224, 224]``; pass
        them to :meth:`generate`."""
        spec = family_spec(self.config)
        if spec.hf_image_prompt is None:
            owners = " / ".join(other.display_name for other in FAMILIES.values() if other.hf_image_prompt)
            raise ValueError(f"build_inputs_with_image is a {owners} method")
        history = [tuple(turn) for turn in (history or [])]
        ids, start = spec.hf_image_prompt(unwrap(tokenizer), query, history, self.config.image_length)
        size = image_size(self.config)
        return BatchEncoding({"input_ids": torch.tensor([ids], device=self.device), "pre_image_length": start,
                              "images": preprocess(image_path, size).to(self.device)})

    # ------------------------------------------------------------------ generate
    def generate(self, input_ids: Any = None, **kwargs: Any) -> torch.Tensor:
        """Hugging Face ``generate`` for greedy and sampling search (see ``visualglm.compat.generate``):
        returns ``[B, T + new]``, the input ids followed by the new ones."""
        if "inputs" in kwargs:
            if input_ids is not None:
                raise TypeError("generate() got both inputs and input_ids")
            input_ids = kwargs.pop("inputs")
        return generate(self.model, input_ids, banned_ranges=self._undecodable(), **kwargs)

    def _undecodable(self) -> tuple[tuple[int, int], ...]:
        """Output rows the checkpoint's tokenizer has no id for (never chosen); none when it has no tokenizer."""
        if self._banned is None:
            from visualglm.checkpoint.tokenizer import load_tokenizer

            directory = getattr(self.model, "checkpoint_dir", None)
            try:
                tokenizer = load_tokenizer(directory) if directory is not None else None
            except (OSError, ValueError):
                tokenizer = None
            self._banned = () if tokenizer is None else tuple(model_undecodable_ranges(self.model, tokenizer))
        return self._banned

    def __repr__(self) -> str:
        return f"CompatModel({self.config.family}, {self.dtype}, {self.device})"
