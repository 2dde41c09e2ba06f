"""The package's import graph: no cycle between its packages and top-level modules, and no private
name imported across them (issue 23). Read from the source with ``ast``, lazy imports included."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmlite"
KERNELS = PACKAGE.parent / "kernels" / "src"  # installed as llmlite.kernels


def unit(module: str) -> str:
    """The node a module belongs to: ``llmlite.quant`` for ``llmlite.quant.gptq``, a top-level
    module (``llmlite.models``) for itself, ``llmlite`` for the package's ``__init__``."""
    parts = module.split(".")
    if len(parts) > 2 or ((len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) or parts[1:] == ["kernels"]):
        return ".".join(parts[:2])
    return module


def imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, name) for every ``llmlite`` import in the package, lazy
    ones included; ``from llmlite.x import y`` names module ``llmlite.x.y`` where y is a module.
    Imports under ``if TYPE_CHECKING:`` are left out (they never run)."""
    found = []
    files = [(f, f.relative_to(PACKAGE.parent).with_suffix("").parts) for f in sorted(PACKAGE.rglob("*.py"))]
    files += [
        (f, ("llmlite", "kernels", *f.relative_to(KERNELS).with_suffix("").parts))
        for f in KERNELS.rglob("*.py")
    ]
    for file, parts in files:
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in _runtime_nodes(ast.parse(file.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("llmlite")
            ):
                found += [(module, _submodule(node.module, a.name), a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(module, a.name, "") for a in node.names if a.name.startswith("llmlite")]
    return found


def _runtime_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield child
                yield from _runtime_nodes(child)
            continue
        yield node
        yield from _runtime_nodes(node)


def _submodule(module: str, name: str) -> str:
    path = PACKAGE.parent.joinpath(*module.split("."), name)
    return f"{module}.{name}" if path.with_suffix(".py").exists() or path.is_dir() else module


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (each as the path that closes it)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_reader_sees_the_package():
    pairs = imports()
    assert len(pairs) > 100 and ("llmlite.api", "llmlite.runinfo", "staged_output") in pairs
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the search finds one


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target, _ in imports():
        if unit(source) != unit(target):
            graph[unit(source)].add(unit(target))
    assert cycles(graph) == []


def test_no_private_name_crosses_a_package():
    crossing = [
        f"{source} imports {name} from {target}"
        for source, target, name in imports()
        if name.startswith("_") and not name.startswith("__") and unit(source) != unit(target)
    ]
    assert crossing == []


def test_no_cycle_between_modules():
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target, _ in imports():
        if source != target:
            graph[source].add(target)
    assert cycles(graph) == []
