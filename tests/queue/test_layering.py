"""The queue node's modules import each other in layers, never in a circle (issue 15): each file can
be read and changed on its own. Every import counts, also those under `if TYPE_CHECKING:` and inside
functions, since a type-only circle ties the files together as much as a runtime one. And the
workflow engine (`casola/flow/`) is a client of the node, never a reader of its internals: it
imports nothing of `casola.queue` (DESIGN "Workflows").

Read from the source with `ast`, never by importing: the test sees what a reader of the files sees.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "casola.queue"


def modules(folder: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at `folder` (its __init__ as the package)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module that the module `name` (at `path`) names in an import, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base  # `from pkg import submodule` names the submodule


def queue_graph() -> dict[str, set[str]]:
    found = modules(ROOT / "casola" / "queue")
    known = set(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        graph[name] = {m for m in imported(name, path, known) if m in known and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_counts_every_kind_of_import(tmp_path: Path) -> None:
    known = {"p", "p.a", "p.b", "p.c", "p.d"}
    src = tmp_path / "a.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "from p import b\n"
        "if TYPE_CHECKING:\n    from .c import X\n"
        "def f():\n    import p.d\n"
    )
    assert set(imported("p.a", src, known)) == {"typing", "p.b", "p.c", "p.d"}


def test_casola_queue_has_no_import_cycle() -> None:
    graph = queue_graph()
    assert len(graph) > 5, "casola/queue was not found"
    edges = "\n".join(f"  {a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]))
    print(f"casola.queue imports:\n{edges}")
    cycle = find_cycle(graph)
    assert cycle is None, "casola.queue modules import each other in a circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", ["flow", "realtime"])
def test_the_workflow_engine_and_realtime_sessions_do_not_import_the_queue_node(package: str) -> None:
    found = modules(ROOT / "casola" / package)
    assert found, f"casola/{package} was not found"
    bad = [
        f"{name} imports {m}"
        for name, path in found.items()
        for m in imported(name, path, set(found))
        if m == QUEUE or m.startswith(QUEUE + ".")
    ]
    assert not bad, f"casola/{package} must reach the queue node only through what it is handed: " + "; ".join(bad)


def test_the_workflow_engine_and_realtime_sessions_have_no_import_cycle() -> None:
    found = {**modules(ROOT / "casola" / "flow"), **modules(ROOT / "casola" / "realtime")}
    known = set(found)
    graph = {name: {m for m in imported(name, path, known) if m in known and m != name} for name, path in found.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "casola.flow / casola.realtime modules import each other in a circle: " + " -> ".join(cycle)
