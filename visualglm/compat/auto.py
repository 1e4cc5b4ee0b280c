"""``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``transformers``' ``from_pretrained``
arguments: applied where they mean something here, refused with a message where they do not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visualglm.checkpoint.hub import resolve_checkpoint_dir
from visualglm.checkpoint.load import load
from visualglm.checkpoint.tokenizer import load_tokenizer
from visualglm.compat.model import CompatModel
from visualglm.compat.tokenizer import CompatTokenizer, refuse_extra
from visualglm.config import image_size, read_config
from visualglm.families import FAMILIES, FamilySpec, family_spec

# Accepted and ignored: they change nothing here (no remote code runs; loading always streams tensors
# from memory-mapped files; a local directory needs no download options).
_MODEL_IGNORED = ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "local_files_only", "cache_dir",
                  "force_download", "resume_download", "offload_state_dict")
_TOKENIZER_IGNORED = ("trust_remote_code", "use_fast", "local_files_only", "cache_dir", "force_download",
                      "resume_download", "clean_up_tokenization_spaces")


def model_device(device_map: Any) -> torch.device:
    """The one device a ``device_map`` names: None/"cpu", "cuda"/"cuda:N"/N, "auto" (CUDA when there is
    one), or a dict sending every module to the same device. Splitting a model over devices is refused."""
    if isinstance(device_map, dict):
        targets = set(device_map.values())
        if len(targets) != 1:
            raise ValueError("device_map spreading the model over several devices is not supported: load it on "
                             "one device, or split it with tensor parallelism (visualglm.distributed, torchrun)")
        device_map = targets.pop()
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r} splits the model over devices, which is not supported: use "
                         "'cpu', 'cuda', 'auto' or tensor parallelism (visualglm.distributed, torchrun)")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device(f"cuda:{device_map}")
    if isinstance(device_map, (str, torch.device)):
        try:
            return torch.device(device_map)
        except RuntimeError:
            pass
    raise ValueError(f"device_map must be 'cpu', 'cuda', 'cuda:N', 'auto', a GPU index or a dict sending every "
                     f"module to one device; got {device_map!r}")


def tokenizer_family(tokenizer: Any) -> FamilySpec:
    """The family of a tokenizer found without a config.json: the first whose ``tokenizer_class`` it is,
    text-only families first (ChatGLM-6B and VisualGLM-6B share a tokenizer, and without the model config
    VisualGLM's image placeholder count is unknown anyway)."""
    matches = [spec for spec in FAMILIES.values() if isinstance(tokenizer, spec.tokenizer_class)]
    if not matches:
        raise ValueError(f"no model family uses a {type(tokenizer).__name__} tokenizer")
    return min(matches, key=lambda spec: spec.multimodal)


def config_tokenizer(tokenizer: Any, config: Any) -> CompatTokenizer:
    """The tokenizer with its model config's image details: the vision tower's input size (the model's own,
    what ChatSession uses; GLM-4V's tokenizer config repeats it) and, for a family told where its image
    goes, the placeholder count."""
    spec = family_spec(config)
    size = image_size(config) if spec.multimodal else None
    length = config.image_length if spec.hf_image_prompt is not None else None
    return CompatTokenizer(tokenizer, spec, image_size=size, image_length=length)


def _quantize(load_in_8bit: bool, load_in_4bit: bool, quantization_config: Any) -> int | None:
    if quantization_config is not None:
        raise ValueError("quantization_config (bitsandbytes, GPTQ, ...) is not supported: pass load_in_8bit=True or "
                         "load_in_4bit=True, or call model.quantize(8 or 4)")
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit exclude each other")
    return 8 if load_in_8bit else 4 if load_in_4bit else None


class AutoModel:
    """``AutoModel.from_pretrained(path, trust_remote_code=True, ...)`` for the three families."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | Path, *model_args: Any, torch_dtype: Any = None,
                        dtype: Any = None, device_map: Any = None, load_in_8bit: bool = False,
                        load_in_4bit: bool = False, quantization_config: Any = None, revision: str | None = None,
                        **kwargs: Any) -> CompatModel:
        """Load with ``visualglm.load``. ``torch_dtype`` (or ``dtype``): a torch dtype, its name, or
        ``"auto"``/None for the checkpoint's own (float16 becomes bfloat16 on CPU); ``device_map``: see
        :func:`model_device`; ``load_in_8bit``/``load_in_4bit`` quantize the language model while loading.
        ``trust_remote_code`` and ``low_cpu_mem_usage`` are accepted: no remote code runs, and loading
        always streams tensors without a full-precision copy."""
        if model_args:
            raise TypeError("from_pretrained takes the model path and keyword arguments only")
        if revision not in (None, "main"):
            raise ValueError(f"revision={revision!r}: download that revision and pass its local directory")
        for name in _MODEL_IGNORED:
            kwargs.pop(name, None)
        refuse_extra(kwargs, "from_pretrained()")
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError("torch_dtype and dtype name the same thing: pass one of them")
        chosen = torch_dtype if torch_dtype is not None else dtype
        model = load(pretrained_model_name_or_path, dtype=None if chosen == "auto" else chosen,
                     device=model_device(device_map), quantize=_quantize(load_in_8bit, load_in_4bit,
                                                                          quantization_config), progress=True)
        return CompatModel(model)


class AutoModelForCausalLM(AutoModel):
    """Same as :class:`AutoModel` (GLM-4V-9B's model card loads it under this name)."""


class AutoTokenizer:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | Path, *inputs: Any, padding_side: str = "left",
                        encode_special_tokens: bool = False, revision: str | None = None,
                        **kwargs: Any) -> CompatTokenizer:
        """The checkpoint's tokenizer with the ``transformers`` call style (:class:`CompatTokenizer`).
        Prompts are padded on the left only (the models need it); special-token strings typed in text stay
        plain text (``encode_special_tokens=True`` is refused)."""
        if inputs:
            raise TypeError("from_pretrained takes the tokenizer path and keyword arguments only")
        if revision not in (None, "main"):
            raise ValueError(f"revision={revision!r}: download that revision and pass its local directory")
        if padding_side != "left":
            raise ValueError("padding_side must be 'left': the models read left-padded prompts")
        if encode_special_tokens:
            raise ValueError("encode_special_tokens=True is not supported: text never turns into special tokens")
        for name in _TOKENIZER_IGNORED:
            kwargs.pop(name, None)
        refuse_extra(kwargs, "from_pretrained()")
        directory = resolve_checkpoint_dir(pretrained_model_name_or_path)
        tokenizer = load_tokenizer(directory)
        if not (directory / "config.json").is_file():
            return CompatTokenizer(tokenizer, tokenizer_family(tokenizer),
                                   image_size=getattr(tokenizer, "image_size", None))
        return config_tokenizer(tokenizer, read_config(directory))
