"""Replacing modules in an NNX model graph, in place.

Used by NNX recalibration (which wraps each batch norm for its duration) and
by conversion between flax's and jbn's NNX batch norms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def _children(node: Any) -> list[tuple[Any, Any]]:
    if isinstance(node, (list, nnx.List)):
        return list(enumerate(node))
    if isinstance(node, (dict, nnx.Dict)):
        return list(node.items())
    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
    return []


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(node, (list, dict, nnx.List, nnx.Dict)):
        node[key] = value
    else:
        setattr(node, key, value)


def module_paths(model: nnx.Module, predicate: Callable[[Any], bool]) -> dict[int, str]:
    """``id(module) -> "a/0/b"`` for every module of the graph that ``predicate`` accepts."""
    return {
        id(node): "/".join(map(str, path))
        for path, node in nnx.iter_graph(model)
        if predicate(node)
    }


def replace_modules(
    model: nnx.Module, predicate: Callable[[Any], bool], make: Callable[[Any], Any]
) -> list[tuple[Any, Any]]:
    """Replaces, in place, every module below ``model`` that ``predicate`` accepts with ``make(module)``.

    Modules inside attributes, ``nnx.List``/``nnx.Dict`` and plain lists and
    dicts held as data are all found. A module referenced twice is replaced by
    one new module in both places, so sharing is kept. ``model`` itself is not
    replaced (a caller decides what to do with a root that matches).

    Returns:
      ``[(old, new)]``, one pair per replaced module, in graph order.
    """
    parents = [node for _, node in nnx.iter_graph(model) if _children(node)]
    made: dict[int, tuple[Any, Any]] = {}
    for parent in parents:
        for key, child in _children(parent):
            if predicate(child):
                if id(child) not in made:
                    made[id(child)] = (child, make(child))
                _set_child(parent, key, made[id(child)][1])
    return list(made.values())
