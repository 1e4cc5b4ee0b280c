"""The model families and their registry: one :class:`FamilySpec` per family, looked up by name.

Everything family-specific outside the model code lives in the family's module here (``chatglm``,
``visualglm``, ``glm4v``); adding a family is one module and one line in ``FAMILIES``
(docs/adding-a-family.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from visualglm.config import FAMILY_NAMES, ConfigError
from visualglm.families.chatglm import CHATGLM
from visualglm.families.glm4v import GLM4V
from visualglm.families.spec import FamilySpec, KeyMap
from visualglm.families.visualglm import VISUALGLM

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (CHATGLM, VISUALGLM, GLM4V)}

__all__ = ["FAMILIES", "FamilySpec", "KeyMap", "family_spec"]


def family_spec(of: Any) -> FamilySpec:
    """The spec of a family name (or a spec), a config (its ``family``) or a model (its ``config.family``).

    ConfigError for a family we recognise but do not implement (GLM-4 text checkpoints) or do not know.
    """
    if isinstance(of, FamilySpec):
        return of
    if isinstance(of, nn.Module):
        of = of.config
    name = of if isinstance(of, str) else of.family
    spec = FAMILIES.get(name)
    if spec is None:
        known = ", ".join(s.display_name for s in FAMILIES.values())
        label = FAMILY_NAMES.get(name, repr(name))
        raise ConfigError(f"{label} models are not supported (supported: {known})")
    return spec
