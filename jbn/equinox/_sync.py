"""Merging the running statistics that Equinox replicas kept in their ``eqx.nn.State``.

The merge is :mod:`jbn._sync`'s, on the state's ``jbn.equinox.BatchNorm``
entries (found by their content: dicts of ``mean``, ``var`` and counts) as one
tree keyed by their markers; every other entry passes through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .. import _checks as checks
from .._sync import UNMAPPED, check_replica_axis, merge_over_axis, merge_stacked, stack

_TOOL = "jbn.equinox.sync_batch_stats"
_ENTRY = frozenset({"mean", "var", "count", "feature_count"})


def _is_statistics(value: Any) -> bool:
    """A ``jbn.equinox.BatchNorm``'s state entry: a dict of mean, var and counts."""
    return isinstance(value, dict) and {"mean", "var"} <= set(value) <= _ENTRY


def _statistics(state: Any, what: str) -> tuple[Sequence[Any], Any, dict[str, dict]]:
    """``state``'s entries, its keys, and its batch norms' entries keyed by marker."""
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"{what} must be an eqx.nn.State (or, for states, a list of them), got "
            f"{type(state).__name__}"
        )
    values, keys = state.tree_flatten()
    tree = {
        _label(i, k): v
        for i, (k, v) in enumerate(zip(keys, values, strict=True))
        if _is_statistics(v)
    }
    if not tree:
        raise ValueError(
            f"{what} holds no jbn.equinox.BatchNorm statistics (a dict with 'mean' and 'var'); "
            "an eqx.nn.BatchNorm model's state is merged after jbn.equinox.convert"
        )
    return values, keys, tree


def _label(i: int, key: Any) -> str:
    """An entry's name in the merged tree: its marker (a path from eqx.nn.make_with_state)."""
    return key if isinstance(key, str) else f"entry {i}"


def _with(values: Sequence[Any], keys: Any, merged: dict[str, dict]) -> eqx.nn.State:
    new = [merged.get(_label(i, k), v) for i, (k, v) in enumerate(zip(keys, values, strict=True))]
    return eqx.nn.State.tree_unflatten(keys, new)


def sync_batch_stats(
    states: eqx.nn.State | Sequence[eqx.nn.State],
    counts: ArrayLike | Sequence[float] | None = None,
    *,
    axis_name: Any = None,
    unbiased: bool = False,
) -> eqx.nn.State:
    """Merges the running statistics that Equinox replicas kept separately.

    The Equinox counterpart of :func:`jbn.sync_batch_stats` (same formula and
    options): each ``jbn.equinox.BatchNorm``'s ``mean`` and ``var`` become those
    of all the replicas' data together, each replica weighted by its count. Its
    step ``count`` and per-channel ``feature_count`` become the totals over the
    replicas (with a count above 0), as the merged statistics average all their
    steps. The batch norms' entries are found in the state by their content (a
    dict of ``mean``, ``var``, ``count`` and ``feature_count``); every other entry
    (other stateful layers, ``eqx.nn.BatchNorm`` ones: convert those first) passes
    through unchanged. Three ways to call it:

    * a list of the replicas' states (the same model's): returns one state,
      whose other entries are ``states[0]``'s;
    * one state with a leading replica axis on every entry, as an ensemble made
      with ``eqx.filter_vmap`` has: every replica's slice gets the merged
      statistics (the shapes stay);
    * inside ``jax.vmap``, ``pmap`` or ``shard_map`` with ``axis_name``: the
      device's own state and count; every device gets the merged statistics.

    Args:
      states: the replicas' ``eqx.nn.State``, as above.
      counts: how many values each replica's statistics summarize (None: equal),
        as :func:`jbn.sync_batch_stats` takes them, with ``axis_name`` and ``unbiased``.
      axis_name: the named mapped axis whose devices hold the replicas, or None.
      unbiased: the variances are Bessel-corrected (``unbiased_running_var=True``).

    Returns:
      The merged ``eqx.nn.State`` (the states given are not modified).
    """
    if axis_name is not None:
        if isinstance(states, (list, tuple)):
            raise ValueError("with axis_name, states is this device's own state, not a list")
        values, keys, tree = _statistics(states, "states")
        checks.axis_size(axis_name, _TOOL, UNMAPPED)
        return _with(values, keys, merge_over_axis(tree, counts, axis_name, unbiased, "states"))
    if isinstance(states, (list, tuple)):
        parts = [_statistics(s, f"states[{i}]") for i, s in enumerate(states)]
        if not parts:
            raise ValueError("states is an empty list: give at least one replica's state")
        stacked = stack([tree for _, _, tree in parts], "states")
        values, keys, _ = parts[0]
        return _with(values, keys, merge_stacked(stacked, counts, unbiased, "states"))
    values, keys, tree = _statistics(states, "states")
    check_replica_axis(
        tree,
        [(k,) for k in tree],
        "states is one state",
        "a list of the replicas' states or a state with a leading replica axis (as "
        "eqx.filter_vmap makes for an ensemble)",
        lambda _: 1,  # a jbn.equinox.BatchNorm's statistics have one feature axis
    )
    merged = merge_stacked(tree, counts, unbiased, "states")
    back = jax.tree.map(lambda m, old: jnp.broadcast_to(m, jnp.shape(old)), merged, tree)
    return _with(values, keys, back)
