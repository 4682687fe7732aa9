"""The house's shape, as facts a reviewer can check: short modules, a batching runtime that knows nothing of the
model, and no import cycle anywhere in the repository (vqa_async, bench, tests, tools; imports inside functions
and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("vqa_async", "bench", "tests", "tools")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for root in ROOTS for p in (REPO / root).rglob("*.py")}
PACKAGE = {name: p for name, p in MODULES.items() if name.split(".")[0] == "vqa_async"}


def _bases(name: str) -> list[str]:
    """Where an absolute import in module `name` may be found, nearest first: pytest puts a test's own folder
    (and its parents up to the repository) on sys.path, so `from fakes import ...` in tests/ is tests/fakes.py."""
    parts = module_name(MODULES[name].parent / "x.py").split(".")[:-1]  # the module's folder, dotted
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]


def _resolve(name: str, target: str) -> str | None:
    for base in _bases(name):
        candidate = f"{base}.{target}" if base else target
        if candidate in MODULES:
            return candidate
    return None


def imports(name: str) -> set[str]:
    """The repository's modules that module `name` imports, anywhere in it (a name imported from a package counts
    as the submodule when it is one), and the top-level names of everything else it imports."""
    out: set[str] = set()
    path = MODULES[name]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                module = ".".join(package + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if (found := _resolve(name, target)) is not None:
                out.add(found)
            elif target and target.split(".")[0] not in ROOTS and _resolve(name, target.split(".")[0]) is None:
                out.add(target.split(".")[0])  # a third-party or standard module (torch, aiohttp, ...)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in seen and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen and (cycle := visit(start, [start])):
            return cycle
    return None


GRAPH = {name: {m for m in imports(name) if m in MODULES and m != name} for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_400_lines(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= 400


def test_the_batching_runtime_imports_neither_torch_nor_the_model() -> None:
    for name in (m for m in PACKAGE if m.startswith("vqa_async.batching")):
        bad = {m for m in imports(name) if m.split(".")[0] == "torch" or m.startswith(
            ("vqa_async.model", "vqa_async.core", "vqa_async.http"))}
        assert not bad, (name, bad)


def test_the_package_imports_nothing_the_wheel_leaves_out() -> None:
    """bench/, tests/ and tools/ are not shipped: the package importing one would fail once installed."""
    bad = {(name, m) for name in PACKAGE for m in GRAPH[name] if m.split(".")[0] != "vqa_async"}
    assert not bad


def test_no_import_cycle() -> None:
    # A package's __init__ that re-exports its modules is its face, not a dependency of them: a module that
    # imports its own package's face would be a cycle, and is caught here.
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_the_top_level_folders() -> None:
    """bench, tests, tools and the package as four nodes: the tests may use the bench and the bench the package,
    but not the other way round too."""
    tops = {root: {m.split(".")[0] for name in MODULES if name.split(".")[0] == root for m in GRAPH[name]} - {root}
            for root in ROOTS}
    cycle = find_cycle(tops)
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_and_the_graph_sees_the_repository() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # what the checks above rest on: imports inside functions, a test's sibling by its bare name, bench -> lib
    assert "bench.lib.workloads" in GRAPH["bench.lib.loadgen"]  # inside main()
    assert "tests.fakes" in GRAPH["tests.app.test_http_api"]  # `from fakes import ...`
    assert "bench.lib.forms" in GRAPH["bench.lib.workloads"]
    assert "vqa_async.client.bulk" in GRAPH["vqa_async.cli"]
