"""Family knowledge lives in one place: no module outside a family's own names a family.

Everything family-specific sits in ``visualglm/families/<family>.py`` (the FamilySpec), the model code in
``visualglm/models/`` and the config classes in ``visualglm/config.py``; every other module asks the spec.
This test fails when a string constant equal to a family name appears anywhere else, so a new
``if family == "..."`` cannot creep back in (docs/adding-a-family.md).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from visualglm.config import FAMILY_NAMES

PACKAGE = Path(__file__).resolve().parent.parent / "visualglm"
FAMILY_OWNED = ("config.py", "models/", "families/")

# "visualglm" is also the project's name: these modules use it as such (a program name, the owner of
# the served models, the quantization method written into config.json), never to pick a family. The exact
# count per module is pinned, so a family comparison added there still fails.
PROJECT_NAME_USES = {
    "cli/main.py": 1,  # argparse prog
    "distributed/launch.py": 2,  # python -m visualglm, in the torchrun command lines
    "serving/worker.py": 1,  # the served model's default name
    "serving/api.py": 1,  # OpenAI /v1/models "owned_by"
    "serving/__init__.py": 1,  # the package's logger ("visualglm"), shown by serve and web
    "checkpoint/quantized.py": 1,  # quantization_config.quant_method of our own quantized checkpoints
    "kernels/native/__init__.py": 1,  # the cache folder of built kernels (~/.cache/visualglm/kernels)
}


def _family_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FAMILY_NAMES]


def test_no_family_literal_outside_the_family_modules() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(FAMILY_OWNED):
            continue
        hits = _family_constants(path)
        project = [h for h in hits if h[1] == "visualglm"]
        if project and len(project) == PROJECT_NAME_USES.get(rel):
            hits = [h for h in hits if h[1] != "visualglm"]
        found += [f"visualglm/{rel}:{line} names the family {value!r}" for line, value in hits]
    assert not found, "ask visualglm.families.family_spec(...) instead:\n" + "\n".join(found)


def test_project_name_allowance_is_current() -> None:
    """The allowance above matches the code (a stale entry would hide a future family literal)."""
    counts = Counter()
    for rel in PROJECT_NAME_USES:
        counts[rel] = sum(1 for _, v in _family_constants(PACKAGE / rel) if v == "visualglm")
    assert dict(counts) == PROJECT_NAME_USES


def test_every_family_has_a_spec_and_a_config_class() -> None:
    from visualglm.config import CONFIG_CLASSES
    from visualglm.families import FAMILIES

    assert set(FAMILIES) == set(CONFIG_CLASSES)
    for name, spec in FAMILIES.items():
        assert spec.config_class is CONFIG_CLASSES[name] and spec.config_class.family == name
