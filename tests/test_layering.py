"""The package's imports respect the dependency order of docs/architecture.md: lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "visualglm"

# Rank of each top-level part of the package (docs/architecture.md: config < models, tokenizers, image, quant <
# peft, distributed < checkpoint < generation < finetune < demo < serving, compat, batch < cli). Equal ranks may
# not import each other either.
RANKS = {
    "config": 0,
    "models": 1, "tokenizers": 1, "image": 1, "quant": 1, "kernels": 1,
    "families": 1.5,  # one FamilySpec per model family: classes, key maps, plans, defaults (data)
    "peft": 2, "distributed": 2,
    "checkpoint": 3,
    "generation": 4,
    "finetune": 5, "bench": 5,
    "demo": 5.5,  # the shipped model (default for serving and the CLI), its data, training and evaluation
    "serving": 6, "compat": 6, "batch": 6,  # batch: data-set jobs on the engine (one machine or Ray)
    "__init__": 6.5,  # the public API (load, ...): only the command line sits above it
    "cli": 7, "__main__": 8,
}
# The root __init__ may reach anything (lazily, inside its functions): its own imports are not checked.
EXEMPT = {"__init__"}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "visualglm":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from visualglm import models` names a part; `from visualglm import load` the root API.
            found += [(node.lineno, f"visualglm.{alias.name}") for alias in node.names
                      if node.module == "visualglm" and alias.name in RANKS]
    return found


def _own_part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if rel.parts else "__init__"


def test_every_part_has_a_rank() -> None:
    parts = {_own_part(p) for p in PACKAGE.rglob("*.py")}
    unranked = parts - set(RANKS) - EXEMPT
    assert not unranked, f"add these package parts to RANKS (and to docs/architecture.md): {sorted(unranked)}"


def test_no_upward_imports() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _own_part(path)
        if own in EXEMPT:
            continue
        for line, module in _imports(path):
            target = _part(module)
            if target is None or target == own:
                continue
            if RANKS[target] >= RANKS[own]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module} ({target})")
    assert not violations, "imports against the dependency order:\n" + "\n".join(violations)


def test_config_uses_only_the_standard_library() -> None:
    names = {m.split(".")[0] for _, m in _imports(PACKAGE / "config.py")}
    assert names <= {"__future__", "dataclasses", "json", "pathlib", "typing"}, names


def test_models_import_only_torch_and_config() -> None:
    for path in (PACKAGE / "models").rglob("*.py"):
        for line, module in _imports(path):
            top = module.split(".")[0]
            ok = top in {"__future__", "math", "torch", "collections", "dataclasses", "typing"} or (
                module.startswith(("visualglm.config", "visualglm.models")))
            assert ok, f"{path.name}:{line} imports {module}"


def test_architecture_page_names_every_part() -> None:
    """docs/architecture.md's layout lists every package part, so the page cannot silently fall behind."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [part for part in RANKS if part not in EXEMPT | {"__main__"}
               and f"visualglm/{part}/" not in page and f"visualglm/{part}.py" not in page]
    assert not missing, f"docs/architecture.md's layout does not list: {missing}"
