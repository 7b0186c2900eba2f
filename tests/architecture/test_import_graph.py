"""The core's import graph has no cycle, between modules or between its folders, and lazy
(function-local) imports count too: DESIGN.md wants the arrows to point down
(cli -> rl -> engine/train/sync/rewards/data/checks -> models/algo/checkpoint -> kernels/config)."""

from __future__ import annotations

import ast
from pathlib import Path

import miles_core

ROOT = Path(miles_core.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every miles_core module `path` imports, anywhere in the file (`from pkg import sub` names
    the submodule when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between top-level parts of miles_core (a folder, or a root module)."""
    top = lambda name: ".".join(name.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        out.setdefault(top(src), set()).update(top(d) for d in dsts if top(d) != top(src) and top(d) != "miles_core")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
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


def test_the_walker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_cycle():
    graph = import_graph()
    assert "miles_core.rl.loop" in graph and "miles_core.rl.run" in graph["miles_core.rl.loop"]
    assert cycles(graph) == []


def test_no_folder_cycle():
    folders = folder_graph(import_graph())
    assert "miles_core.models" in folders["miles_core.checkpoint"]
    assert cycles(folders) == []


def test_models_never_import_checkpoint():
    folders = folder_graph(import_graph())
    assert "miles_core.checkpoint" not in folders["miles_core.models"]
