"""Source checkpoint key -> our parameter name, as data.

Each family's maps (one per source format) live in its module of ``visualglm.families`` (``FamilySpec.keymaps``);
this module applies them. ``{}`` stands for a layer index; ``None`` means the key is dropped on load
(for example ChatGLM's ``rotary_emb.inv_freq``, which the reference itself ignores and recomputes).
The inverse (ours -> source) is derived, so conversion back to a source layout cannot drift.
"""

from __future__ import annotations

import re

from visualglm.families.spec import KeyMap

__all__ = ["KeyMap", "UnknownKeyError", "invert", "map_key"]

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class UnknownKeyError(KeyError):
    """A checkpoint key that the key map does not describe."""


def _template(key: str) -> tuple[str, str | None]:
    """``a.3.b`` -> (``a.{}.b``, ``"3"``); keys without a layer index come back unchanged."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".{}." + key[match.end():], match.group(1)


def map_key(key: str, keymap: KeyMap) -> str | None:
    """Our name for a source ``key`` (None when it is dropped); UnknownKeyError when not in the map."""
    template, index = _template(key)
    if template not in keymap:
        raise UnknownKeyError(key)
    target = keymap[template]
    if target is None or index is None:
        return target
    return target.replace("{}", index, 1)


def invert(keymap: KeyMap) -> KeyMap:
    """Our name -> source key (dropped keys have no inverse)."""
    inverse: KeyMap = {}
    for source, target in keymap.items():
        if target is not None:
            if target in inverse:
                raise ValueError(f"key map is not invertible: {target!r} has two sources")
            inverse[target] = source
    return inverse
