"""Replacing modules in an NNX model graph, in place.

Used by NNX recalibration (which wraps each batch norm for its duration), by
conversion between flax's and jbn's NNX batch norms, and by freezing. The walk
finds a module wherever it sits (module attributes, ``nnx.List``, ``nnx.Dict``,
``nnx.Sequential``, lists, dicts and tuples wrapped in ``nnx.data``), and a
module shared by several parents stays shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.nnx import graph


def module_paths(model: Any, predicate: Callable[[Any], bool]) -> dict[int, str]:
    """``id(module) -> "a/0/b"`` for every module of the graph that ``predicate`` accepts."""
    return {
        id(node): "/".join(map(str, path))
        for path, node in nnx.iter_graph(model)
        if predicate(node)
    }


def replace_modules(
    model: Any,
    predicate: Callable[[nnx.Module], bool],
    make: Callable[[Any], nnx.Module],
) -> Any:
    """Replaces, in place, every module of an NNX graph for which ``predicate`` holds.

    Each selected module ``m`` is replaced by ``make(m)`` in every place that
    refers to it (one ``make`` call per module, so shared modules stay shared);
    the walk does not descend into selected modules nor into what ``make``
    returns. Mutable containers (modules, ``nnx.List``, ``nnx.Dict``, lists,
    dicts) are changed in place; an immutable one (a tuple) is rebuilt and
    stored in its parent.

    Args:
      model: an NNX graph node: a module, or a list, dict or tuple of them.
      predicate: selects the modules to replace.
      make: builds the replacement of one selected module (one that ``predicate`` accepted).

    Returns:
      ``model`` itself, or ``make(model)`` when ``model`` is itself selected,
      or a rebuilt ``model`` when it is a tuple.
    """
    made: dict[int, Any] = {}
    visited: dict[int, Any] = {}  # id -> the node or its rebuilt replacement

    def replacement(node: Any) -> Any:
        if isinstance(node, nnx.Module) and predicate(node):
            if id(node) not in made:
                made[id(node)] = (node, make(node))  # keeps node alive: ids stay unique
            return made[id(node)][1]
        return walk(node)

    def walk(node: Any) -> Any:
        if id(node) in visited:
            return visited[id(node)][1]
        impl = graph.get_node_impl(node)
        if impl is None:  # a leaf: Variable, array, static value
            return node
        visited[id(node)] = (node, node)
        changed = {}
        for key, child in impl.node_dict(node).items():
            new = replacement(child)
            if new is not child:
                changed[key] = new
        if not changed:
            return node
        if impl.set_key is not None:
            for key, new in changed.items():
                impl.set_key(node, key, new)
            return node
        children, aux = impl.flatten(node)
        rebuilt = impl.unflatten([(k, changed.get(k, v)) for k, v in children], aux)
        visited[id(node)] = (node, rebuilt)
        return rebuilt

    return replacement(model)
