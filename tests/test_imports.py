"""The import graph of tandem has no cycle, and the config layer stays light.

The graph is read from the source with ``ast``: an edge for every
``import tandem.x`` / ``from tandem.x import y`` (``y`` too when it is a
module) at module level or inside a function, i.e. every import that runs.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "tandem"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """tandem module -> the tandem modules it imports when it runs."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports = _runtime_imports(ast.parse(path.read_text()), package)
        graph[name] = {m for m in imports if m in paths and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, if any."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_reads_function_level_imports_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import tandem.wire\n"
        "if TYPE_CHECKING:\n"
        "    from tandem.config import RunConfig\n"
        "def f():\n"
        "    from tandem.datasets import load_dataset\n"
    )
    found = _runtime_imports(tree, "tandem")
    assert {"tandem.wire", "tandem.datasets"} <= found
    assert "tandem.config" not in found


def test_tandem_has_no_import_cycle():
    graph = import_graph()
    assert "tandem.config" in graph and "tandem.strategies.fedavg" in graph
    assert "tandem.registry" in graph["tandem.config"]  # edges are read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_config_layer_imports_no_method_and_no_torch():
    code = (
        "import sys, tandem.config\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or "
        "m.startswith(('tandem.strategies', 'tandem.clients', 'tandem.models')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_cloud_and_edge_meet_only_in_the_protocol_layer():
    graph = import_graph()
    crossing = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        for side, other in (("strategies", "clients"), ("clients", "strategies"))
        if module.startswith(f"tandem.{side}.") and target.startswith(f"tandem.{other}")
    )
    assert crossing == []
