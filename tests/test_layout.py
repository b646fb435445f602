"""The package's shape: no import cycles, no private names borrowed across modules, small modules.

Read from the source with :mod:`ast` (nothing is imported), so a function-local import that
hides a cycle counts like a top-level one; imports under ``if TYPE_CHECKING:`` do not (they
never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shardmerge"
# A module past this many lines is due for a split (recipe.py reached 1,783 before it became
# the shardmerge.recipe package).
MAX_MODULE_LINES = 1200


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: anywhere but under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) not in skipped and isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (``shardmerge.plan.MergePlan`` -> plan)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the shardmerge modules it imports. Edges to a module's own parent packages
    (and to the top-level package, which only re-exports lazily) are left out: importing a
    submodule runs its parents first anyway."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.module is not None:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                owner = _owner(target, modules)
                if owner is None or owner == name or owner == "shardmerge":
                    continue
                if name.startswith(owner + "."):
                    continue
                graph[name].add(owner)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_find_cycles_sees_a_cycle_and_a_clean_graph():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_counts_function_local_imports_not_type_checking(tmp_path):
    pkg = tmp_path / "shardmerge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from shardmerge.three import X\n"
        "def f():\n    from shardmerge import two\n"
    )
    (pkg / "two.py").write_text("from shardmerge.one import f\n")
    (pkg / "three.py").write_text("")
    graph = import_graph(_modules(pkg))
    assert set(graph) == {"shardmerge", "shardmerge.one", "shardmerge.two", "shardmerge.three"}
    assert graph["shardmerge.one"] == {"shardmerge.two"}
    assert find_cycles(graph) == [["shardmerge.one", "shardmerge.two"]]


def test_no_import_cycles():
    """pipeline/distributed, plan/plan_stack and recipe/recipe_slices were cycles held
    together by function-local imports; a new one fails here with its members named."""
    assert find_cycles(import_graph(_modules())) == []


def test_no_private_names_imported_across_modules():
    """A name one module needs from another is public there (no leading underscore)."""
    borrowed = []
    for name, path in _modules().items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shardmerge"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        borrowed.append(f"{name}:{node.lineno} {node.module}.{alias.name}")
    assert borrowed == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = _modules()[name].read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it"
