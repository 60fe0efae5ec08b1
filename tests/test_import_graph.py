"""runner/ has no import cycle: every module can be imported first, in any order.

The graph is read from the source (ast), so it counts every import: at the top, inside a
function (a lazy import is still a dependency), and under ``if TYPE_CHECKING:`` (a cycle hidden
from the interpreter is still one between the modules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import runner

Graph = Mapping[str, frozenset[str]]
RUNNER_ROOT = Path(runner.__file__).parent


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path) -> dict[str, frozenset[str]]:
    """Which modules of the package each of its modules imports (other packages left out)."""
    modules = module_files(root)
    return {
        name: frozenset(_imported(name, path, modules)) - {name} for name, path in modules.items()
    }


def _imported(name: str, path: Path, modules: Mapping[str, Path]) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, modules)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # ``from package import module`` needs the module, not the package's own code
                yield from _known(submodule if submodule in modules else source, modules)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _known(dotted: str, modules: Mapping[str, Path]) -> Iterator[str]:
    """The module ``dotted`` names, or the package it lies in, if it is one of ours."""
    while dotted:
        if dotted in modules:
            yield dotted
            return
        dotted = dotted.rpartition(".")[0]


def cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected group of more than one module, each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph has a few hundred nodes at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(_cycle_within(graph, set(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _cycle_within(graph: Graph, group: set[str]) -> list[str]:
    """A path from the group's first module back to itself, through the group only."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for target in sorted(graph[node] & group):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                frontier.append(target)
    raise AssertionError(f"{sorted(group)} is not strongly connected")  # pragma: no cover


def test_runner_has_no_import_cycle() -> None:
    graph = import_graph(RUNNER_ROOT)
    assert "runner.emulator.emulator" in graph["runner.emulator"]  # the graph is really read
    found = cycles(graph)
    assert found == [], "import cycles in runner/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_kind_of_import_is_an_edge(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "from pkg.a import A\n",
        "a.py": "import pkg.b\nA = 1\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from ..a import A\n"
            "from pkg import sub\nimport json\n"
        ),
    }
    for name, text in sources.items():
        (package / name).write_text(text)

    graph = import_graph(package)

    assert graph == {
        "pkg": frozenset({"pkg.a"}),
        "pkg.a": frozenset({"pkg.b"}),
        "pkg.b": frozenset({"pkg.sub.c"}),
        "pkg.sub": frozenset(),
        "pkg.sub.c": frozenset({"pkg.a", "pkg.sub"}),
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_cycles_finds_each_group_once_and_nothing_in_a_tree() -> None:
    tree: Graph = {"a": frozenset({"b", "c"}), "b": frozenset({"c"}), "c": frozenset()}
    assert cycles(tree) == []
    two: Graph = {
        "a": frozenset({"b"}),
        "b": frozenset({"a", "c"}),
        "c": frozenset({"d"}),
        "d": frozenset({"c"}),
    }
    assert sorted(cycles(two)) == [["a", "b", "a"], ["c", "d", "c"]]
