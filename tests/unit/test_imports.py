"""Layers depend downward only: no module of ``src/farsync`` imports, directly or through
others, a module that imports it back — counting the imports inside functions too (a
lazy import that dodges a cycle at start-up is still a cycle in the design)."""

from __future__ import annotations

import ast
import os

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def modules() -> dict[str, str]:
    """Every farsync module name -> its file."""
    out = {}
    root = os.path.join(SRC, "farsync")
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), SRC)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The farsync modules ``name`` imports anywhere in its file. ``from a.b import c``
    counts as an import of ``a.b.c`` when that is a module, else of ``a.b``; relative
    imports are resolved against ``name``'s package."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)) is not None:
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)) is not None:
            return c
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the farsync modules it imports. A package's ``__init__`` re-exports its
    submodules, so importing a name from a package is an edge to the package; the edges
    from a package to its own submodules are left out (they make a submodule that
    imports a sibling through the package look circular, which at run time it is not)."""
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = imports_of(name, path, known)
        if path.endswith("__init__.py"):
            deps = {d for d in deps if not d.startswith(name + ".")}
        graph[name] = deps
    return graph


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from farsync.x import y\n    from . import z\n")
    assert imports_of("farsync.p.m", str(src), {"farsync.x", "farsync.x.y", "farsync.p.z"}) == {"farsync.x.y", "farsync.p.z"}


def test_no_import_cycle_in_farsync():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
