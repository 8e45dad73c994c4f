"""The data modules import one another one way: no circle, not even through a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

import lcl_fast.data

DATA = Path(lcl_fast.data.__file__).parent


def _imports(path: Path) -> set[str]:
    """Sibling modules of ``lcl_fast.data`` that ``path`` imports anywhere (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
    return found


def test_the_data_modules_have_no_import_circle():
    graph = {p.stem: _imports(p) & {q.stem for q in DATA.glob("*.py")} for p in DATA.glob("*.py")}
    graph.pop("__init__")
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 2:
            return
        assert state.get(module) != 1, "import circle: " + " -> ".join([*path, module])
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep != "__init__":
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])
    assert "streaming" in graph["batches"] and "batches" not in graph["streams"] | graph["streaming"]
