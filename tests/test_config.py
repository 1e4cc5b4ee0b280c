"""config.json reading/writing and the named-config registry."""

from __future__ import annotations

import json

import pytest

from visualglm.config import (
    ChatGLMConfig,
    ConfigError,
    config_from_dict,
    config_to_dict,
    detect_family,
    get_config,
    read_config,
    write_config,
)

from .conftest import GOLDEN_DIR

OFFICIAL_CHATGLM_6B = {  # THUDM/chatglm-6b config.json (spec A2)
    "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
    "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
    "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
    "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28,
    "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
    "use_cache": True, "vocab_size": 130528,
}


def test_official_config_round_trips(tmp_path) -> None:
    config = config_from_dict(OFFICIAL_CHATGLM_6B)
    assert config == get_config("chatglm-6b")
    assert config.head_dim == 128
    assert config.extra["architectures"] == ["ChatGLMModel"]
    write_config(config, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in OFFICIAL_CHATGLM_6B.items():
        assert written[key] == value, key


def test_config_json_wins_over_defaults() -> None:
    config = config_from_dict({"model_type": "chatglm", "vocab_size": 150528, "num_layers": 3})
    assert (config.vocab_size, config.num_layers, config.hidden_size) == (150528, 3, 4096)


def test_golden_config_is_read() -> None:
    if not (GOLDEN_DIR / "chatglm-6b").is_dir():
        pytest.skip("no golden chatglm-6b folder")
    config = read_config(GOLDEN_DIR / "chatglm-6b")
    assert (config.num_layers, config.hidden_size, config.gmask_token_id) == (2, 64, 1001)


@pytest.mark.parametrize(("fields", "family"), [
    ({}, "chatglm"),
    ({"eva_config": {}, "qformer_config": {}}, "visualglm"),
    ({"padded_vocab_size": 1, "multi_query_attention": True, "vision_config": {}}, "glm4v"),
    ({"padded_vocab_size": 1, "multi_query_attention": True}, "glm4"),
])
def test_family_detection(fields: dict, family: str) -> None:
    assert detect_family({"model_type": "chatglm", **fields}) == family


@pytest.mark.parametrize(("data", "message"), [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({}, "unknown model_type None"),
    ({"model_type": "chatglm", "hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
    ({"model_type": "chatglm", "num_layers": 0}, "num_layers must be a positive integer"),
    ({"model_type": "chatglm", "vocab_size": 1000}, "bos_token_id 130004 is outside the vocabulary"),
    ({"model_type": "chatglm", "padded_vocab_size": 8, "multi_query_attention": True}, "GLM-4 checkpoints are not"),
    ({"model_type": "chatglm", "padded_vocab_size": 8, "vision_config": {}, "rmsnorm": False}, "rmsnorm=False"),
    ({"model_type": "chatglm", "eva_config": [1]}, "eva_config must be a JSON object"),
])
def test_bad_configs_are_named(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_read_config_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(tmp_path)


def test_registry_returns_independent_copies() -> None:
    a = get_config("chatglm-tiny")
    a.num_layers = 99
    a.extra["x"] = 1
    b = get_config("chatglm-tiny")
    assert b.num_layers == 2 and "x" not in b.extra
    with pytest.raises(KeyError, match="unknown config name"):
        get_config("nope")


def test_to_dict_has_model_type() -> None:
    assert config_to_dict(ChatGLMConfig())["model_type"] == "chatglm"


@pytest.mark.parametrize(("text", "message"), [("{oops", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                               (b"\xff\xfe{}", "is not valid JSON")])
def test_read_json_object_names_the_file(tmp_path, text, message) -> None:
    from visualglm.config import read_json_object

    path = tmp_path / "some_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())

    class CustomError(Exception):
        pass

    with pytest.raises(CustomError, match=message) as info:
        read_json_object(path, CustomError)
    assert str(path) in str(info.value)
    path.write_text('{"a": 1}')
    assert read_json_object(path, CustomError) == {"a": 1}


def test_image_size_is_read_from_each_family_vision_config() -> None:
    import pytest

    from visualglm.config import ConfigError, get_config, image_size

    visual, glm4v = get_config("visualglm-tiny"), get_config("glm-4v-tiny")
    assert image_size(visual) == tuple(visual.eva_config.image_size)
    assert image_size(glm4v) == (glm4v.vision_config.image_size,) * 2
    with pytest.raises(ConfigError, match="no vision tower"):
        image_size(get_config("chatglm-tiny"))
