"""Named axes: the axis_name a layer reduces over, and whether it is bound here."""

from __future__ import annotations

from typing import Any

from jax import lax


def named_axes(value: Any, name: str = "axis_name") -> Any:
    """The named batch axis (or a tuple of names) a layer reduces over: hashable, not None."""
    value = tuple(value) if isinstance(value, list) else value
    if value is None or (isinstance(value, tuple) and not value):
        raise ValueError(
            f"{name} must name the batch axis of the vmap / pmap / shard_map the layer runs "
            f"under (e.g. 'batch'), or a tuple of names; got {value!r}"
        )
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (a name or a tuple of names), got {value!r}"
        ) from None
    return value


def axis_name(value: Any) -> Any:
    """A hashable axis name: a name, a tuple of names, or None."""
    return tuple(value) if isinstance(value, list) else value


def axis_index_groups(value: Any, name: Any) -> tuple[tuple[int, ...], ...] | None:
    if value is None:
        return None
    if name is None:
        raise ValueError(
            "axis_index_groups needs axis_name: it groups the devices of that named axis"
        )
    try:
        return tuple(tuple(int(i) for i in group) for group in value)
    except TypeError:
        raise TypeError(
            f"axis_index_groups must be a sequence of sequences of ints, got {value!r}"
        ) from None


def _bound(name: Any) -> bool:
    """Whether ``name`` (a name or a tuple of names) is bound here by pmap, shard_map or vmap."""
    try:
        lax.axis_size(name)
    except NameError:
        return False
    return True


def axis_size(name: Any, fn: str = "bn_forward", otherwise: str = "leave axis_name=None") -> int:
    """The number of devices along ``name`` (1 for None); a clear error if it is not bound.

    The one axis check: ``fn`` is the function the message tells to call inside
    a mapped axis, ``otherwise`` what to do instead.
    """
    if name is None:
        return 1
    if not _bound(name):
        raise ValueError(
            f"axis_name={name!r} is not bound here: call {fn} inside pmap, shard_map or vmap "
            f"with that axis_name, or {otherwise}"
        )
    return int(lax.axis_size(name))


def bound_axis_name(name: Any) -> Any:
    """``name`` if it is bound here (pmap, shard_map, vmap), else None."""
    return name if name is not None and _bound(name) else None
