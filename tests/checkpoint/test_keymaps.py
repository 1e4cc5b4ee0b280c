"""Key maps are data: lookups with layer indices, drops, and a derived inverse that round-trips."""

from __future__ import annotations

import pytest

from visualglm.checkpoint.keymaps import UnknownKeyError, invert, map_key
from visualglm.checkpoint.load import build_model
from visualglm.config import get_config
from visualglm.families import FAMILIES
from visualglm.families.chatglm import CHATGLM_HF

KEYMAPS = {(spec.name, fmt): keymap for spec in FAMILIES.values() for fmt, keymap in spec.keymaps.items()}


def test_layer_index_is_carried() -> None:
    key = "transformer.layers.17.attention.query_key_value.weight"
    assert map_key(key, CHATGLM_HF) == key


def test_rotary_buffer_is_dropped() -> None:
    assert map_key("transformer.layers.3.attention.rotary_emb.inv_freq", CHATGLM_HF) is None


def test_unknown_key_raises() -> None:
    with pytest.raises(UnknownKeyError):
        map_key("transformer.layers.0.attention.q_proj.weight", CHATGLM_HF)


@pytest.mark.parametrize("source", sorted(KEYMAPS))
def test_inverse_round_trips_over_every_model_parameter(source: tuple[str, str]) -> None:
    family, _ = source
    keymap = KEYMAPS[source]
    inverse = invert(keymap)
    tiny = {"chatglm": "chatglm-tiny", "visualglm": "visualglm-tiny", "glm4v": "glm-4v-tiny"}
    model = build_model(get_config(tiny[family]))
    for name, _ in model.named_parameters(remove_duplicate=False):
        source_key = map_key(name, inverse)
        assert source_key is not None, name
        assert map_key(source_key, keymap) == name


def test_non_invertible_map_is_rejected() -> None:
    with pytest.raises(ValueError, match="not invertible"):
        invert({"a": "x", "b": "x"})
