"""Entries of an ``eqx.nn.State``: read one with a clear error, make an index for one.

Shared by :func:`jbn.equinox.convert`, folding and recalibration, which read a
model's state by its layers' ``StateIndex`` and build new indices.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx


def index_with(init: Any, marker: Any) -> eqx.nn.StateIndex:
    """A ``StateIndex`` holding ``init`` under ``marker``, as ``eqx.nn.make_with_state`` makes."""
    index = eqx.nn.StateIndex(init)
    object.__setattr__(index, "marker", marker)  # as eqx.nn.make_with_state does
    return index


def state_entry(state: eqx.nn.State, index: eqx.nn.StateIndex, where: str) -> Any:
    """``state.get(index)``, or one error naming ``state`` where it has no such entry.

    Args:
      state: the model's ``eqx.nn.State``.
      index: a layer's ``StateIndex``.
      where: the layer's place in the model, for the message (e.g. ``"layers[0]"``).
    """
    try:
        return state.get(index)
    except KeyError:
        raise ValueError(
            f"state has no entry {index.marker!r}, which model's {where} needs: state must be "
            "model's eqx.nn.State (what eqx.nn.make_with_state returned with it), not another "
            "model's"
        ) from None
