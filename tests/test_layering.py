"""The package's imports respect the dependency order of docs/architecture.md: lower layers never import higher ones."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "visualglm"

# Rank of each top-level part of the package (docs/architecture.md: config < models, tokenizers, image, quant <
# peft, distributed < checkpoint < generation < finetune < demo < serving, compat, batch < cli). Equal ranks may
# not import each other either.
RANKS = {
    "config": 0,
    "kernels": 0.5,  # compute kernels on plain tensors (and the optional native extension): import nothing above
    "models": 1, "tokenizers": 1, "image": 1, "quant": 1,
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


# ---- no import cycles between the package's modules -----------------------------------------------------------
# Cycles that exist today and belong to another part's owners, each named by its modules; empty: none. The
# test fails on any other cycle, and on an entry here that no longer is one (a stale entry would hide a new
# cycle among the same modules).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, at any depth (function bodies included), except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported_modules(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports, lazily or not. ``from a.b import c`` counts as importing
    the module ``a.b.c`` where that is one, else ``a.b``. The parent packages Python runs on the way are
    not counted: a package's ``__init__`` importing its own modules is the usual layout, not a cycle."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:
                    found.add(target)
                elif base in MODULES:
                    found.add(base)
    return found - {module}


def _import_graph() -> dict[str, set[str]]:
    return {module: _imported_modules(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(frozenset(component))
    return components


def _describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    edges = [f"  {module} imports {', '.join(sorted(graph[module] & component))}" for module in sorted(component)]
    return "\n".join([f"cycle among {', '.join(sorted(component))}:", *edges])


def test_no_import_cycles() -> None:
    """No two modules of the package import each other, directly or through others, counting the imports
    inside functions (a lazy import hides a cycle from Python, not from the design)."""
    graph = _import_graph()
    new = [component for component in _cycles(graph) if component not in KNOWN_CYCLES]
    assert not new, "import cycles (move the shared pieces into a module both can import):\n" + "\n".join(
        _describe(component, graph) for component in new)


def test_known_cycles_are_current() -> None:
    assert not KNOWN_CYCLES - set(_cycles(_import_graph())), "remove the entries that are no longer cycles"


def test_cycle_finder_sees_lazy_imports() -> None:
    """The finder itself: a cycle closed by an import inside a function is found, and one inside
    ``if TYPE_CHECKING:`` is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = "import visualglm.config\nif TYPE_CHECKING:\n    import visualglm.models\n" \
             "def f():\n    from visualglm.checkpoint import io\n"
    tree = ast.parse(source)
    names = {alias.name for node in _runtime_nodes(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names}
    assert names == {"visualglm.config", "io"}
