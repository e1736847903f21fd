"""How the Equinox tools run a model on a batch unless told otherwise, and find its layers.

An Equinox model takes one example; the default ``forward`` maps it over the
batch with ``jax.vmap``, binding its batch norms' ``axis_name``, and threads the
state through unmapped (the idiom of :class:`jbn.equinox.BatchNorm`'s own
docstring). :class:`jbn.equinox.Tent` and
:func:`jbn.equinox.recalibrate_batch_stats` both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ._batch_norm import BatchNorm

Forward = Callable[[Any, eqx.nn.State, Any], tuple[Any, eqx.nn.State]]


def is_batch_norm(node: Any) -> bool:
    """A batch norm of either library (jbn's or Equinox's): a leaf for tree walks."""
    return isinstance(node, (BatchNorm, eqx.nn.BatchNorm))


def vmapped_forward(model: Any, what: str) -> Forward:
    """``forward(model, state, batch) -> (output, state)``: ``model`` vmapped over ``batch``.

    The named axis is the one ``axis_name`` of ``model``'s ``jbn.equinox.BatchNorm``
    layers (None without any); layers naming different axes need a forward of
    the user's, which ``what`` (the tool) asks for.
    """
    names: list[Any] = []
    for leaf in jax.tree.leaves(model, is_leaf=is_batch_norm):
        if isinstance(leaf, BatchNorm) and leaf.axis_name not in names:
            names.append(leaf.axis_name)
    if len(names) > 1:
        raise ValueError(
            f"{what}: the model's batch norms name different batch axes {names}, and the "
            "default forward binds one: give your own, (model, state, batch) -> (output, state)"
        )
    return _Vmapped(names[0] if names else None)


class _Vmapped(eqx.Module):
    # A module, not a closure: equal for equal axis names, so eqx.filter_jit, which
    # takes it as a static argument, compiles once for every call of a tool.
    axis_name: Any = eqx.field(static=True)

    def __call__(self, model: Any, state: eqx.nn.State, batch: Any) -> tuple[Any, eqx.nn.State]:
        run = jax.vmap(model, axis_name=self.axis_name, in_axes=(0, None), out_axes=(0, None))
        return run(batch, state)
