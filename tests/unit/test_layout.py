"""The house's shape, as facts a reviewer can check: short modules, a batching runtime that knows nothing of the
model, and no import cycle (imports inside functions and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vqa_async"
MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The vqa_async modules that module `name` imports, anywhere in it (a name imported from a package counts
    as the submodule when it is one)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in out if m in MODULES or m.split(".")[0] != "vqa_async"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_400_lines(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= 400


def test_the_batching_runtime_imports_neither_torch_nor_the_model() -> None:
    for name in (m for m in MODULES if m.startswith("vqa_async.batching")):
        bad = {m for m in imports(name) if m.split(".")[0] == "torch" or m.startswith(
            ("vqa_async.model", "vqa_async.core", "vqa_async.http"))}
        assert not bad, (name, bad)


def test_no_import_cycle() -> None:
    graph = {name: {m for m in imports(name) if m in MODULES and m != name} for name in MODULES}
    # A package's __init__ that re-exports its modules is its face, not a dependency of them: a module that
    # imports its own package's face would be a cycle, and is caught below.
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
