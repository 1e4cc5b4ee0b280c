"""Model configurations: typed dataclasses read from and written to the official ``config.json``.

Standard library only (no torch): every layer of the package may import this module.

Rules:
- ``config.json`` always wins over the class defaults; fields we do not model are kept in ``extra`` and
  written back unchanged, so a config survives a read/write round trip.
- The class defaults are the values of the released checkpoint (THUDM/chatglm-6b after its "slim" update),
  not the stale defaults of the reference ``ChatGLMConfig`` class (vocab 150528 and friends).
- A model family is chosen from config.json's fields, never from a file name. All three official
  checkpoints say ``model_type: "chatglm"``; VisualGLM-6B adds ``eva_config``/``qformer_config`` and
  GLM-4(V) uses the ChatGLM2+ field set (``padded_vocab_size``, ``multi_query_attention``, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclass
class ChatGLMConfig:
    """ChatGLM-6B (first generation) decoder. Field names are those of the official config.json."""

    model_type: ClassVar[str] = "chatglm"  # what config.json says
    family: ClassVar[str] = "chatglm"  # which of our model classes it describes

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3  # <pad>
    tie_word_embeddings: bool = True  # transformers' default; lm_head shares the embedding matrix
    torch_dtype: str = "float16"
    use_cache: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # Fields of config.json that are not modelled above (architectures, auto_map, ...), kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ConfigError when the numbers cannot form this architecture."""
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size",
                    "max_sequence_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        # 2D rotary splits each head in two halves, each rotated in pairs: head_dim must divide by 4.
        if self.head_dim % (4 if self.position_encoding_2d else 2):
            raise ConfigError(f"head_dim {self.head_dim} does not fit the rotary layout")
        for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is outside the vocabulary "
                                  f"(vocab_size {self.vocab_size})")


@dataclass
class EvaViTConfig:
    """EVA-CLIP ViT of VisualGLM-6B (sat ViT argument names, as in config.json's ``eva_config``)."""

    num_layers: int = 39
    hidden_size: int = 1408
    num_attention_heads: int = 16
    inner_hidden_size: int = 6144
    layernorm_epsilon: float = 1e-6
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    patch_size: int = 14
    in_channels: int = 3
    pre_len: int = 1  # one CLS token before the patches
    max_sequence_length: int = 257
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former of VisualGLM-6B (config.json's ``qformer_config``)."""

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    inner_hidden_size: int | None = None  # sat default: 4 * hidden_size
    vocab_size: int = 32  # number of learned query tokens
    is_decoder: list[bool] = field(default_factory=lambda: [True, False] * 6)  # layers with cross-attention
    cross_attn_hidden_size: int = 1408
    layernorm_epsilon: float = 1e-12
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ffn_size(self) -> int:
        return self.inner_hidden_size or 4 * self.hidden_size


@dataclass
class VisualGLMConfig(ChatGLMConfig):
    """VisualGLM-6B: ChatGLM-6B fields plus the image encoder's (``eva_config``, ``qformer_config``)."""

    family: ClassVar[str] = "visualglm"

    image_length: int = 32
    eva_config: EvaViTConfig = field(default_factory=EvaViTConfig)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)

    def validate(self) -> None:
        super().validate()
        for name, sub in (("eva_config", self.eva_config), ("qformer_config", self.qformer_config)):
            if sub.hidden_size % sub.num_attention_heads:
                raise ConfigError(f"{name}: hidden_size {sub.hidden_size} is not divisible by "
                                  f"num_attention_heads {sub.num_attention_heads}")
        if len(self.qformer_config.is_decoder) < self.qformer_config.num_layers:
            raise ConfigError("qformer_config.is_decoder needs one entry per layer")
        if self.qformer_config.vocab_size != self.image_length:
            raise ConfigError(f"image_length {self.image_length} must equal the number of Q-Former queries "
                              f"(qformer_config.vocab_size {self.qformer_config.vocab_size})")


@dataclass
class GLM4VisionConfig:
    """EVA2-CLIP-E vision tower of GLM-4V-9B (config.json's ``vision_config``)."""

    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    layer_norm_eps: float = 1e-6
    image_size: int = 1120
    patch_size: int = 14
    in_channels: int = 3
    num_positions: int = 6401
    scaling_factor: float = 8.0
    hidden_act: str = "gelu"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_image_tokens(self) -> int:
        """Vectors the tower emits per image after the 2x2 conv (boi/eoi not counted)."""
        return (self.image_size // self.patch_size // 2) ** 2


@dataclass
class GLM4VConfig:
    """GLM-4V-9B: the GLM-4 decoder (ChatGLM2+ field names) plus ``vision_config``."""

    model_type: ClassVar[str] = "chatglm"
    family: ClassVar[str] = "glm4v"

    padded_vocab_size: int = 151552
    vocab_size: int = 151552
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    num_layers: int = 40
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    layernorm_epsilon: float = 1.5625e-07
    seq_length: int = 8192
    rope_ratio: float = 1.0
    eos_token_id: list[int] = field(default_factory=lambda: [151329, 151336, 151338])
    pad_token_id: int = 151329
    boi_token_id: int = 151339
    eoi_token_id: int = 151340
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    # Architecture switches of the ChatGLM2+ code base; only the GLM-4V-9B values are implemented.
    rmsnorm: bool = True
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    vision_config: GLM4VisionConfig = field(default_factory=GLM4VisionConfig)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def max_sequence_length(self) -> int:
        return self.seq_length

    @property
    def kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    def validate(self) -> None:
        required = {"rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True,
                    "apply_residual_connection_post_layernorm": False, "original_rope": True}
        for name, value in required.items():
            if getattr(self, name) != value:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported (GLM-4V-9B uses {value!r})")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of the "
                              f"{self.kv_heads} key/value groups")
        if self.kv_channels % 4:
            raise ConfigError(f"kv_channels {self.kv_channels} does not fit the partial rotary layout")
        vision = self.vision_config
        if vision.image_size % (2 * vision.patch_size):
            raise ConfigError(f"vision image_size {vision.image_size} must be a multiple of 2 x patch_size")
        if vision.num_positions != (vision.image_size // vision.patch_size) ** 2 + 1:
            raise ConfigError(f"vision num_positions {vision.num_positions} does not match image_size/patch_size")


# Nested config.json objects and their dataclasses.
_NESTED = {"eva_config": EvaViTConfig, "qformer_config": QFormerConfig, "vision_config": GLM4VisionConfig}

CONFIG_CLASSES: dict[str, type] = {cls.family: cls for cls in (ChatGLMConfig, VisualGLMConfig, GLM4VConfig)}

AnyConfig = ChatGLMConfig | VisualGLMConfig | GLM4VConfig

# Families we recognise; the ones without a config class are announced but not implemented yet.
FAMILY_NAMES = {"chatglm": "ChatGLM-6B", "visualglm": "VisualGLM-6B", "glm4": "GLM-4", "glm4v": "GLM-4V"}


def image_size(config: AnyConfig) -> tuple[int, int]:
    """The ``(height, width)`` images are resized to for ``config``'s vision tower (VisualGLM-6B's
    ``eva_config``, GLM-4V-9B's ``vision_config``). ConfigError for a text-only model."""
    if isinstance(config, GLM4VConfig):
        size = config.vision_config.image_size
    elif isinstance(config, VisualGLMConfig):
        size = config.eva_config.image_size
    else:
        raise ConfigError(f"{FAMILY_NAMES.get(config.family, config.family)} has no vision tower")
    # config.json writes one side (GLM-4V-9B) or [height, width] (VisualGLM-6B's sat arguments).
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def detect_family(data: dict[str, Any]) -> str:
    """Our family name for a config.json dict (see the module docstring for the rules)."""
    model_type = data.get("model_type")
    if model_type != "chatglm":
        raise ConfigError(f"unknown model_type {model_type!r} (supported: 'chatglm' checkpoints of "
                          "ChatGLM-6B, VisualGLM-6B and GLM-4V-9B)")
    if "eva_config" in data or "qformer_config" in data:
        return "visualglm"
    if "padded_vocab_size" in data or "multi_query_attention" in data:
        return "glm4v" if "vision_config" in data else "glm4"
    return "chatglm"


def config_from_dict(data: dict[str, Any]) -> AnyConfig:
    """Build the config of the family ``detect_family`` finds; unknown fields go to ``extra``."""
    family = detect_family(data)
    cls = CONFIG_CLASSES.get(family)
    if cls is None:
        raise ConfigError(f"{FAMILY_NAMES[family]} checkpoints are not supported yet")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known_values = {k: _nested_from_dict(k, v) for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
    try:
        config = cls(**known_values, extra=extra)
    except TypeError as exc:  # pragma: no cover - dataclass with all defaults; kept for clarity
        raise ConfigError(str(exc)) from exc
    config.validate()
    return config


def _nested_from_dict(name: str, value: Any) -> Any:
    cls = _NESTED.get(name)
    if cls is None:
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in value.items() if k in names},
               extra={k: v for k, v in value.items() if k not in names})


def _plain_dict(obj: Any) -> dict[str, Any]:
    data = dict(obj.extra)
    for f in dataclasses.fields(obj):
        if f.name != "extra":
            value = getattr(obj, f.name)
            data[f.name] = _plain_dict(value) if dataclasses.is_dataclass(value) else value
    return data


def config_to_dict(config: AnyConfig) -> dict[str, Any]:
    """The official config.json fields (``extra`` merged back in, ``model_type`` included)."""
    return {"model_type": config.model_type, **_plain_dict(config)}


def read_config(path: str | Path) -> AnyConfig:
    """Read ``config.json`` (a file or a directory containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return config_from_dict(read_json_object(path, ConfigError))


def read_json_object(path: str | Path, error: type[Exception] = ValueError) -> dict:
    """The JSON object stored in ``path``; a file that is not UTF-8 JSON holding an object raises ``error``
    with a message naming the file (callers pass their own error type: ConfigError, CheckpointError...)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def write_config(config: AnyConfig, path: str | Path) -> None:
    """Write ``config.json`` into a directory (or to the given file path)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    path.write_text(json.dumps(config_to_dict(config), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Named configurations: full sizes of the released models and tiny ones for tests.
NAMED_CONFIGS: dict[str, AnyConfig] = {
    "chatglm-6b": ChatGLMConfig(),
    # Same special-token layout as the golden tiny model (ids 1000..1007 inside a 1024 vocab).
    "chatglm-tiny": ChatGLMConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                                  inner_hidden_size=256, bos_token_id=1004, eos_token_id=1005,
                                  mask_token_id=1000, gmask_token_id=1001, torch_dtype="float32"),
}

NAMED_CONFIGS["visualglm-6b"] = VisualGLMConfig()
NAMED_CONFIGS["visualglm-tiny"] = VisualGLMConfig(
    **{f.name: getattr(NAMED_CONFIGS["chatglm-tiny"], f.name) for f in dataclasses.fields(ChatGLMConfig)
       if f.name != "extra"},
    eva_config=EvaViTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, inner_hidden_size=64),
    qformer_config=QFormerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, is_decoder=[True, False],
                                 cross_attn_hidden_size=32))

NAMED_CONFIGS["glm-4v-9b"] = GLM4VConfig()
NAMED_CONFIGS["glm-4v-tiny"] = GLM4VConfig(
    padded_vocab_size=1024, vocab_size=1024, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
    num_attention_heads=4, num_layers=2, eos_token_id=[1008, 1015, 1017], pad_token_id=1008, boi_token_id=1018,
    eoi_token_id=1019, torch_dtype="float32",
    vision_config=GLM4VisionConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64,
                                   image_size=56, num_positions=17))

# Where a named model's official weights live on the Hugging Face hub.
HUB_IDS: dict[str, str] = {"chatglm-6b": "THUDM/chatglm-6b", "visualglm-6b": "THUDM/visualglm-6b",
                           "glm-4v-9b": "THUDM/glm-4v-9b"}


def get_config(name: str) -> AnyConfig:
    """A fresh copy of a named config (see ``NAMED_CONFIGS``)."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown config name {name!r} (known: {', '.join(sorted(NAMED_CONFIGS))})")
    return config_from_dict(config_to_dict(NAMED_CONFIGS[name]))
