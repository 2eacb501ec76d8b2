"""The code's shape, checked: the engine's modules import each other without a cycle (every
import counts: module level, inside a function, or for type checking only), and no test
module imports another (what they share lives in ``tests/support``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import ROOT

ENGINE = ROOT / "erase_engine"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The modules of ``modules`` that ``path`` imports (``from . import x`` names module ``x``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            # each name is a submodule (an edge to it) or an attribute of ``target`` (an edge to target)
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = sorted((root / "erase_engine").rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imported_modules(p, modules, root) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                return path[path.index(following) :] + [node, following] if following in path else [node, following]
            if following not in state and (cycle := visit(following, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_engine_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and graph["erase_engine.trainer"]  # the walk saw the package and its imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    """The checker itself can fail: a two-module and a three-module cycle, and a tree without one."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lazy_and_type_checking_imports_count(tmp_path):
    """An import inside a function or under TYPE_CHECKING is an edge too (the old loading <->
    adapter cycle was a lazy one), and ``from . import x`` names the module ``x``."""
    package = tmp_path / "erase_engine"
    (package / "hosts").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import version\n")
    (package / "version.py").write_text("")
    (package / "loading.py").write_text("from .hosts.adapter import Adapter\n")
    (package / "hosts" / "__init__.py").write_text("")
    (package / "hosts" / "adapter.py").write_text("def read():\n    from ..loading import read\n")
    graph = import_graph(tmp_path)
    assert graph["erase_engine"] == {"erase_engine.version"}
    assert graph["erase_engine.hosts.adapter"] == {"erase_engine.loading"}
    assert find_cycle(graph) is not None
    (package / "hosts" / "adapter.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import loading\n"
    )
    assert find_cycle(import_graph(tmp_path)) is not None


def test_no_test_module_imports_another():
    tests = ROOT / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in names:
                raise AssertionError(f"{path.name} imports {node.module}: move what they share to tests/support")
            if isinstance(node, ast.Import):
                assert not {alias.name for alias in node.names} & names, path.name


def test_ruff_finds_nothing():
    """The lint the project keeps (pyproject's [tool.ruff]), as part of the suite."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
