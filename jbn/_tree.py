"""Paths in nested dicts of variables (linen's ``params`` and ``batch_stats`` trees)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Path = str | Sequence[str]


def parse_path(path: Path, what: str) -> tuple[str, ...]:
    """``"a/b"`` or ``("a", "b")`` as a tuple of names; a clear error otherwise."""
    if isinstance(path, str):
        parts = tuple(p for p in path.split("/") if p)
    elif isinstance(path, Sequence) and all(isinstance(p, str) for p in path):
        parts = tuple(path)
    else:
        parts = ()
    if not parts:
        raise ValueError(
            f"{what} must be a module path such as 'Conv_0', 'block1/Dense_0' or "
            f"('block1', 'Dense_0'), got {path!r}"
        )
    return parts


def lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    """The entry at ``path``, or None where there is none."""
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def replace(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``tree`` with the entry at ``path`` replaced (copies along the path only)."""
    if not path:
        return value
    tree = dict(tree)
    tree[path[0]] = replace(tree[path[0]], path[1:], value)
    return tree


def remove(tree: Mapping, path: tuple[str, ...]) -> dict:
    """A copy of ``tree`` without the entry at ``path``; dicts left empty are removed too."""
    tree = dict(tree)
    if len(path) == 1:
        tree.pop(path[0], None)
    elif path[0] in tree:
        sub = remove(tree[path[0]], path[1:])
        if sub:
            tree[path[0]] = sub
        else:
            del tree[path[0]]
    return tree


def is_batch_norm_layer(node: Any) -> bool:
    """A batch-norm layer's running statistics: a dict that holds 'mean' and 'var' arrays."""
    return (
        isinstance(node, Mapping)
        and "mean" in node
        and "var" in node
        and not isinstance(node["mean"], Mapping)
    )


def batch_norm_layers(
    tree: Any,
    other: Callable[[tuple[Any, ...], Any], None] | None = None,
    path: tuple[Any, ...] = (),
) -> list[tuple[Any, ...]]:
    """Paths of the batch-norm layers (:func:`is_batch_norm_layer`) of a ``batch_stats`` tree.

    The one walker of statistics trees. Every other node that is not a dict is
    passed to ``other(path, node)``, which may raise (the tree may hold nothing
    else); by default it is skipped.
    """
    if is_batch_norm_layer(tree):
        return [path]
    if isinstance(tree, Mapping):
        return [
            p for key, sub in tree.items() for p in batch_norm_layers(sub, other, path + (key,))
        ]
    if other is not None:
        other(path, tree)
    return []


def to_dicts(tree: Any) -> Any:
    """``tree`` with every mapping (a dict, flax's ``FrozenDict``) rebuilt as a plain dict.

    What ``flax.core.unfreeze`` does, without importing flax: the leaves are the
    same objects, the dicts new ones, so the caller may change them freely.
    """
    if isinstance(tree, Mapping):
        return {key: to_dicts(value) for key, value in tree.items()}
    return tree


def split_entries(state: Any, names: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """``state`` as ``(the rest, the entries named)``: a mode's own entries apart.

    Anything but a mapping is returned as it is, for the state's own check to refuse.
    """
    if not isinstance(state, Mapping):
        return state, {}
    rest = {k: v for k, v in state.items() if k not in names}
    return rest, {k: v for k, v in state.items() if k in names}
