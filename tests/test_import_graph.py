"""jbn's modules import each other without a loop, at module level or inside functions.

A loop (the layer importing its tools, which import the layer) works only by the
order Python happens to run the imports in; a function-level import that closes
it hides the loop until that function runs. The graph is read from the source
with :mod:`ast`, so this needs no framework installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

JBN = Path(__file__).resolve().parent.parent / "jbn"


def module_name(path: Path, root: Path = JBN) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]
) -> set[str]:
    """The jbn modules one import statement loads a name from.

    ``from .. import _checks`` depends on the module ``jbn._checks``;
    ``from .. import bn_forward`` on the package ``jbn`` (its ``__init__``).
    """
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & modules
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    names = {f"{base}.{a.name}" for a in node.names}
    found = names & modules
    return found | ({base} & modules if found != names else set())


def import_graph(root: Path = JBN) -> dict[str, set[str]]:
    """Each module of the package at ``root`` and the package's modules it imports, anywhere."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        module = module_name(path, root)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported(node, module, path.name == "__init__.py", modules)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_jbn_has_no_import_loop():
    graph = import_graph()
    assert {"jbn", "jbn._batch_norm", "jbn.nnx._batch_norm", "jbn.linen._stream"} <= set(graph)
    assert "jbn._batch_norm" in graph["jbn"]  # the walk sees the imports
    assert cycles(graph) == []


def test_the_check_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
