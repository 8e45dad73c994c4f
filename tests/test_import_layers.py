"""The import graph of lcl_fast, read from the source: no circles, and every import runs down the layers.

Every ``import``/``from ... import`` counts, at module level and inside functions alike (a lazy import
is how a circle hides). ``from P import name`` is an edge to ``P.name`` when that is a module, else to
``P``; a module's own parent packages are not edges (Python runs them first, whatever the module says).

Layers, bottom to top (a module may import its own layer and those below, never above):

0. base: ``lcl_fast`` (its names are looked up lazily), ``config`` (the config dataclasses), ``_impl``,
   ``errors``, ``model_configs`` (the configuration registry: JSON files, no torch);
1. ``kernels`` (``lcl_fast.kernels``, the top-level ``kernels/`` folder);
2. ``ops`` (``ops.library``, the custom-op helpers, sits below the op modules that register their ops);
3. ``nn``, and ``targets`` (the loss targets of a token row: the model's and the packer's);
4. model: ``model``, ``generation`` (text from the model; it takes decoded images or a decode function),
   ``loss`` (the model's loss), ``factory`` (builds and loads models);
5. ``data`` (tokenizer, sequences, shard readers, decoding, the loader);
6. ``training`` (trainer parts);
7. ``eval`` (protocols; also what ``lcl_fast.caption`` decodes images with) and ``export``;
8. ``train`` (the trainer's command line) and ``training.evaluation`` (its in-run evaluation: the
   trainer's glue to the eval protocols, used by ``train`` only).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS = {  # module prefix -> layer; the longest matching prefix wins
    "lcl_fast": 0, "lcl_fast.config": 0, "lcl_fast._impl": 0, "lcl_fast.errors": 0, "lcl_fast.model_configs": 0,
    "lcl_fast.kernels": 1,
    "lcl_fast.ops": 2,
    "lcl_fast.nn": 3, "lcl_fast.targets": 3,
    "lcl_fast.model": 4, "lcl_fast.generation": 4, "lcl_fast.loss": 4, "lcl_fast.factory": 4,
    "lcl_fast.data": 5,
    "lcl_fast.training": 6,
    "lcl_fast.eval": 7, "lcl_fast.export": 7,
    "lcl_fast.train": 8, "lcl_fast.training.evaluation": 8,
}  # fmt: skip


def module_files(root: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is a package)}`` for lcl_fast/ and kernels/ (as lcl_fast.kernels)."""
    found = {}
    for path in [*(root / "lcl_fast").rglob("*.py"), *(root / "kernels").rglob("*.py")]:
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[0] == "kernels":
            parts.insert(0, "lcl_fast")
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within lcl_fast (every import statement, wherever it stands)."""
    modules = module_files(root)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import lcl_fast.data.x.y`: the deepest module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert all(layer_of(m) >= 0 for m in module_files())
    assert layer_of("lcl_fast.ops.library") == 2 and layer_of("lcl_fast.training.evaluation") == 8


def test_the_graph_sees_lazy_imports(tmp_path):
    (tmp_path / "lcl_fast" / "sub").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "lcl_fast" / "__init__.py").write_text("")
    (tmp_path / "lcl_fast" / "sub" / "__init__.py").write_text("")
    (tmp_path / "lcl_fast" / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "lcl_fast" / "sub" / "b.py").write_text("from lcl_fast.sub.a import f\nimport lcl_fast.kernels.k\n")
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "k.py").write_text("def g():\n    from ..sub import a\n")
    graph = import_graph(tmp_path)
    assert graph["lcl_fast.sub.a"] == {"lcl_fast.sub.b"}
    assert graph["lcl_fast.sub.b"] == {"lcl_fast.sub.a", "lcl_fast.kernels.k"}
    assert graph["lcl_fast.kernels.k"] == {"lcl_fast.sub.a"}
    assert cycles(graph) == [["lcl_fast.kernels.k", "lcl_fast.sub.a", "lcl_fast.sub.b"]]


def test_no_import_circles():
    found = cycles(import_graph())
    assert found == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_run_down_the_layers():
    upward = sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in import_graph().items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )
    assert upward == [], "imports against the layer order:\n" + "\n".join(upward)
