"""The rotary package's import graph has no cycles (docs/ARCHITECTURE.md: dependencies point one way).

The graph is read from the source with `ast`, without importing anything: every import counts,
at the top of a module or inside a function (a function-level import only defers a cycle to the
first call), relative ones resolved against their package. Before this test the graph had
rotary.completion.calibrate -> engine -> verdict -> calibrate (verdict fitted the gate with
calibrate's helpers and ran completions through the engine), decode -> verdict -> ... -> decode,
and rotary.cli <-> rotary.demo (the demo took cli's DEFAULT_LISTEN); test_no_import_cycles failed
on each of them.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml's package-dir: the module prefix of each folder.
PACKAGES = {
    "rotary": "rotary",
    "rotary.lsp": "lsp",
    "rotary.completion": "completion",
    "rotary.completion.rpc": "completion/rpc",
    "rotary.cache": "cache",
    "rotary.models": "models",
    "rotary.kernels": "kernels",
    "rotary.bench": "bench",
    "rotary.testgen": "testgen",
}


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The rotary modules that module `name` imports, each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import submodule` imports the submodule; `from module import name`, the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import rotary.completion.rpc.worker_pb2 as pb` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                out.setdefault(target, node.lineno)
    return out


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycle_through(start: str, graph: dict[str, dict[str, int]]) -> list[str] | None:
    """The shortest chain of imports from `start` back to it, [start, ..., start], or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in graph[node]:
            if target == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if target not in parent:
                parent[target] = node
                queue.append(target)
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    known = modules()
    steps = [
        f"  {importer} ({known[importer].relative_to(ROOT)}:{graph[importer][target]}) imports {target}"
        for importer, target in zip(cycle, cycle[1:])
    ]
    return "import cycle:\n" + "\n".join(steps)


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "rotary.completion.rpc.worker_pb2" in graph["rotary.lsp.sync"]  # from rotary.completion.rpc import worker_pb2
    assert "rotary.completion.rpc.wire" in graph["rotary.completion.documents"]  # from .rpc.wire import ...
    assert "rotary.completion.engine" in graph["rotary.completion.service"]  # inside a method
    assert "rotary.completion.rpc.worker_pb2" in graph["rotary.completion.rpc.wire"]  # from . import worker_pb2


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 3}, "d": {}}
    assert cycle_through("b", graph) == ["b", "c", "a", "b"]
    assert cycle_through("d", graph) is None


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_import_cycles(package):
    """No module directly in `package` is on a cycle (one across packages fails for each of them)."""
    graph, known = import_graph(), modules()
    found: dict[frozenset, str] = {}
    for name in graph:
        if known[name].parent == ROOT / PACKAGES[package]:
            cycle = cycle_through(name, graph)
            if cycle:
                found.setdefault(frozenset(cycle), describe(cycle, graph))
    assert not found, "\n".join(found.values())
