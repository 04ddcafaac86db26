"""fura's modules import one another without circles: each imports only what sits below it.

Imports are read with `ast`, including those inside functions (a deferred import hides a circle, it
does not remove it). An import of ``fura.a.b`` is an edge to that module only, not to its parent
packages, which Python runs first but which do not depend on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fura

ROOT = Path(fura.__file__).parent


def module_name(path: Path) -> str:
    parts = ("fura", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The fura modules that module ``name`` (at ``path``) imports anywhere in its body.

    ``from pkg import name`` counts the module ``pkg.name`` where there is one, else ``pkg``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: imported_modules(path, name, modules) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    graph = {"fura.a": {"fura.b"}, "fura.b": {"fura.c"}, "fura.c": {"fura.a"}, "fura.d": {"fura.a"}}
    assert cycles(graph) == [["fura.a", "fura.b", "fura.c"]]
    source = tmp_path / "m.py"
    source.write_text("from fura.tuner import layer\nfrom . import config\n\ndef f():\n    import fura.methods\n")
    modules = {"fura.tuner", "fura.tuner.layer", "fura.tuner.config", "fura.tuner.m", "fura.methods"}
    found = imported_modules(source, "fura.tuner.m", modules)
    assert found == {"fura.tuner.layer", "fura.tuner.config", "fura.methods"}


def test_no_import_cycles_among_fura_modules():
    graph = import_graph()
    assert "fura.tuner.layer" in graph and graph["fura.quant"], "the import graph was not read"
    assert cycles(graph) == []
