"""The code's layering, as the README's layout promises it: the read side's projections
stand on the shared kernel alone, and no first-party modules import each other in a
circle (type-only imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared_kernel", "commands", "projections", "streams", "api", "cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (anywhere in it)."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_projections_import_only_the_shared_kernel() -> None:
    wrong = {
        (name, dep)
        for name, deps in _imports().items()
        if name.startswith("projections")
        for dep in deps
        if not dep.startswith(("projections", "shared_kernel"))
    }
    assert not wrong


def test_no_module_imports_itself_through_others() -> None:
    graph = _imports()
    # a package importing its own submodules (registrations) is not a circle back to it
    edges = {n: {d for d in deps if not d.startswith(f"{n}.")} for n, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles
