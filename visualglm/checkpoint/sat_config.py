"""SwissArmyTransformer ``model_config.json`` <-> our configs (sat argument names or HF ones accepted)."""

from __future__ import annotations

import json
import warnings
from typing import Any

from visualglm.checkpoint.io import CheckpointError
from visualglm.config import AnyConfig, ConfigError, config_from_dict, config_to_dict
from visualglm.families import FAMILIES, FamilySpec, family_spec

# sat's model classes (model_config.json "model_class") -> the family each holds (``FamilySpec.sat_model_class``).
SAT_FAMILIES: dict[str, FamilySpec] = {spec.sat_model_class: spec for spec in FAMILIES.values()
                                       if spec.sat_model_class is not None}

_LM_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "bos_token_id",
                "mask_token_id", "gmask_token_id")
_LM_OPTIONAL = ("inner_hidden_size", "layernorm_epsilon", "max_sequence_length", "eos_token_id", "pad_token_id",
                "tie_word_embeddings", "torch_dtype", "position_encoding_2d", "use_cache", "image_length")
_SUBCONFIGS = {"eva_args": "eva_config", "qformer_args": "qformer_config"}  # sat name -> HF name
# Written by sat but irrelevant to the weights: kept out of our config. ``pre_seq_len`` is an argument of
# sat's P-tuning mixin (VisualGLM's released model_config.json carries it); a checkpoint that really has
# prefix weights is refused for its unexpected keys. The ViT arguments appear at the top level too because
# sat collects every sub-module's arguments. ``qkv_layout`` is our own record (see ``save_sat``).
_BOOKKEEPING = {"model_class", "tokenizer_type", "model_parallel_size", "layernorm_order", "pre_seq_len",
                "prefix_projection",
                "image_size", "pre_len", "post_len", "in_channels", "patch_size", "num_classes", "qkv_layout",
                "use_final_layernorm", "model_type", "architectures", "auto_map", "_name_or_path",
                "transformers_version"}
# Architecture arguments whose other values our model cannot represent: {name: allowed value}.
_LM_FIXED = {"layernorm_order": "post", "use_bias": True, "use_final_layernorm": True, "is_decoder": False,
             "num_multi_query_heads": 0, "is_gated_mlp": False, "num_experts": 1, "position_encoding_2d": True,
             "quantization_bit": 0}
_EVA_FIXED = {"layernorm_order": "pre", "use_final_layernorm": False, "post_len": 0, "use_bias": True,
              "num_multi_query_heads": 0, "is_gated_mlp": False, "num_experts": 1}
_QFORMER_FIXED = {"layernorm_order": "post", "use_final_layernorm": True, "use_bias": True,
                  "num_multi_query_heads": 0, "is_gated_mlp": False, "num_experts": 1}
_SAT_LAYERNORM_EPS = 1e-5  # sat's default; model_config.json records layernorm_epsilon only when it differs
_SAT_VIT_DEFAULTS = {"image_size": [224, 224], "patch_size": 16, "pre_len": 1, "post_len": 0, "in_channels": 3}
_SAT_PAD = 3  # sat < 0.4.1 hard-codes pad_token_id = 3


def _require(data: dict[str, Any], name: str, where: str) -> Any:
    value = data.get(name)
    if value is None:
        raise CheckpointError(f"{where} has no {name!r}: cannot build the model without it")
    return value


def _check_fixed(data: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    for name, allowed in fixed.items():
        if name in data and data[name] is not None and data[name] != allowed:
            raise CheckpointError(f"{where}: {name}={data[name]!r} is not supported (this architecture has "
                                  f"{name}={allowed!r})")


def _check_head_size(data: dict[str, Any], where: str) -> None:
    per_head = data.get("hidden_size_per_attention_head")
    if per_head is not None and per_head * data["num_attention_heads"] != data["hidden_size"]:
        raise CheckpointError(f"{where}: hidden_size_per_attention_head={per_head} is not supported (heads "
                              "must split hidden_size evenly)")


def config_from_sat(data: dict[str, Any], *, where: str = "model_config.json",
                    torch_dtype: str | None = None) -> AnyConfig:
    """Our config from a sat ``model_config.json`` dict (HF ``config.json`` names are accepted too).

    Required: num_layers, hidden_size, num_attention_heads, vocab_size, bos/mask/gmask token ids (and for
    VisualGLM ``eva_args``/``qformer_args`` or ``eva_config``/``qformer_config`` with their layer counts and
    sizes). Missing optional fields take sat's defaults: inner_hidden_size 4 * hidden_size,
    layernorm_epsilon 1e-5, pad_token_id 3 (hard-coded by sat < 0.4.1); eos_token_id, which sat never
    records, defaults to the family config's ``<eop>`` (130005, ChatGLM-6B's). Unknown fields are ignored
    with a warning; architecture options that our model cannot represent raise CheckpointError.
    """
    has_image = any(name in data for name in (*_SUBCONFIGS, *_SUBCONFIGS.values()))
    spec = _sat_family(data.get("model_class"), has_image, where)
    hf: dict[str, Any] = {"model_type": spec.config_class.model_type}
    for name in _LM_REQUIRED:
        hf[name] = _require(data, name, where)
    _check_fixed(data, _LM_FIXED, where)
    _check_head_size(data, where)
    hf["inner_hidden_size"] = data.get("inner_hidden_size") or 4 * hf["hidden_size"]
    hf["layernorm_epsilon"] = data.get("layernorm_epsilon") or _SAT_LAYERNORM_EPS
    hf["max_sequence_length"] = data.get("max_sequence_length") or spec.config_class.max_sequence_length
    hf["pad_token_id"] = _SAT_PAD if data.get("pad_token_id") is None else data["pad_token_id"]
    hf["eos_token_id"] = data.get("eos_token_id")
    if hf["eos_token_id"] is None:
        eop = spec.config_class.eos_token_id  # <eop>; sat never records the eos id
        if eop >= hf["vocab_size"]:
            raise CheckpointError(f"{where} has no 'eos_token_id' (sat does not record it) and "
                                  f"{spec.display_name}'s <eop> id {eop} is outside vocab_size "
                                  f"{hf['vocab_size']}: add \"eos_token_id\" to model_config.json")
        hf["eos_token_id"] = eop
    # sat keeps a separate lm_head; load_sat ties it to the embedding when the two are equal.
    hf["tie_word_embeddings"] = bool(data.get("tie_word_embeddings", False))
    hf["torch_dtype"] = data.get("torch_dtype") or torch_dtype or "float16"
    for name in ("position_encoding_2d", "use_cache"):
        if name in data:
            hf[name] = data[name]
    if spec.multimodal:
        hf["image_length"] = data.get("image_length") or 32  # sat's --image_length default
        eva = _subconfig(data, "eva_args", where)
        qformer = _subconfig(data, "qformer_args", where)
        hf["eva_config"] = _eva_from_sat(eva, f"{where} eva_args")
        hf["qformer_config"] = _qformer_from_sat(qformer, hf["image_length"], f"{where} qformer_args")
    elif has_image:
        raise CheckpointError(f"{where}: model_class {data.get('model_class')!r} has no image encoder, but "
                              "eva/qformer arguments are present")
    known = {*_LM_REQUIRED, *_LM_OPTIONAL, *_SUBCONFIGS, *_SUBCONFIGS.values(), *_BOOKKEEPING, *_LM_FIXED,
             "hidden_size_per_attention_head", "cross_attn_hidden_size"}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown field(s) {', '.join(unknown)}", stacklevel=3)
    try:
        return config_from_dict(hf)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _sat_family(model_class: str | None, has_image: bool, where: str) -> FamilySpec:
    """The family of a sat ``model_class``; without one (older sat configs), the family with an image encoder
    when eva/qformer arguments are present, else the text-only one."""
    if model_class is None:
        return next(spec for spec in SAT_FAMILIES.values() if spec.multimodal == has_image)
    spec = SAT_FAMILIES.get(model_class)
    if spec is None:
        raise CheckpointError(f"{where}: model_class {model_class!r} is not supported (supported: "
                              f"{', '.join(SAT_FAMILIES)})")
    return spec


def _subconfig(data: dict[str, Any], sat_name: str, where: str) -> dict[str, Any]:
    value = data.get(sat_name, data.get(_SUBCONFIGS[sat_name]))
    if value is None:
        raise CheckpointError(f"{where} has no {sat_name!r} (or {_SUBCONFIGS[sat_name]!r}): a VisualGLM "
                              "checkpoint needs it to build the image encoder")
    if isinstance(value, str):  # sat passes these as JSON strings on the command line
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise CheckpointError(f"{where}: {sat_name} is not a JSON object") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {sat_name} must be a JSON object")
    return value


def _eva_from_sat(eva: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(eva)
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        _require(eva, name, where)
    _check_fixed(eva, _EVA_FIXED, where)
    _check_head_size(eva, where)
    for name, default in _SAT_VIT_DEFAULTS.items():
        if eva.get(name) is None:
            out[name] = default
    if isinstance(out["image_size"], int):
        out["image_size"] = [out["image_size"], out["image_size"]]
    out["inner_hidden_size"] = eva.get("inner_hidden_size") or 4 * eva["hidden_size"]
    out["layernorm_epsilon"] = eva.get("layernorm_epsilon") or _SAT_LAYERNORM_EPS
    # sat's ViTModel overrides max_sequence_length with pre_len + patches + post_len.
    height, width = out["image_size"]
    patch = out["patch_size"]
    out["max_sequence_length"] = out["pre_len"] + (height // patch) * (width // patch) + out["post_len"]
    out["model_parallel_size"] = 1
    return out


def _qformer_from_sat(qformer: dict[str, Any], image_length: int, where: str) -> dict[str, Any]:
    out = dict(qformer)
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        _require(qformer, name, where)
    _check_fixed(qformer, _QFORMER_FIXED, where)
    _check_head_size(qformer, where)
    layers = qformer["num_layers"]
    is_decoder = qformer.get("is_decoder", False)  # sat's default: no cross-attention
    out["is_decoder"] = [bool(is_decoder)] * layers if isinstance(is_decoder, bool) else list(is_decoder)
    if qformer.get("vocab_size") is None:
        out["vocab_size"] = image_length
    if qformer.get("cross_attn_hidden_size") is None:
        out["cross_attn_hidden_size"] = qformer["hidden_size"]  # sat CrossAttention's default
    out["layernorm_epsilon"] = qformer.get("layernorm_epsilon") or _SAT_LAYERNORM_EPS
    out["model_parallel_size"] = 1
    return out


def sat_model_config(config: AnyConfig, *, mp_size: int = 1, qkv_layout: str = "contiguous") -> dict[str, Any]:
    """The ``model_config.json`` dict sat would write for ``config`` (plus ``eos_token_id``, which our
    config needs and sat does not record, and ``qkv_layout``, our own record of the row order).

    ``pad_token_id`` is written only for the contiguous layout, as sat >= 0.4.1 does (sat < 0.4.1, the
    interleaved era, had no such argument)."""
    spec = family_spec(config)
    if spec.sat_model_class is None:
        raise ValueError(f"{spec.display_name} has no SwissArmyTransformer layout")
    data: dict[str, Any] = {
        "model_class": spec.sat_model_class,
        "tokenizer_type": "THUDM/chatglm-6b",
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "layernorm_order": "post",
        "model_parallel_size": mp_size,
        "max_sequence_length": config.max_sequence_length,
    }
    if config.inner_hidden_size != 4 * config.hidden_size:
        data["inner_hidden_size"] = config.inner_hidden_size
    if config.layernorm_epsilon != _SAT_LAYERNORM_EPS:
        data["layernorm_epsilon"] = config.layernorm_epsilon
    data.update(bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
                gmask_token_id=config.gmask_token_id)
    if qkv_layout == "contiguous":
        data["pad_token_id"] = config.pad_token_id
    data["eos_token_id"] = config.eos_token_id
    data["qkv_layout"] = qkv_layout
    if spec.multimodal:
        full = config_to_dict(config)
        eva = {**full["eva_config"], "layernorm_order": "pre", "use_final_layernorm": False, "post_len": 0,
               "model_parallel_size": mp_size}
        qformer = {**full["qformer_config"], "layernorm_order": "post", "model_parallel_size": mp_size}
        data.update(image_length=config.image_length, eva_args=eva, qformer_args=qformer)
    return data
