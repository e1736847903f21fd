"""Statistics that follow a stream, for Equinox models: :func:`use_stream` and :func:`reset_stream`.

:func:`use_stream` returns the model with every ``jbn.equinox.BatchNorm`` in
the stream mode of :func:`jbn.bn_forward`, and the ``eqx.nn.State`` with each
layer's memory of the stream's statistics (``stream_mean``, ``stream_var``,
``stream_count``, beside its running statistics), which every call updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax

from .. import _checks as checks
from .._relay import Link, Relay
from .._stream import MEMORY, Stream, check_stream, start_memory
from ._batch_norm import BatchNorm
from ._forward import is_batch_norm


def _batch_norms(model: Any, tool: str) -> list[BatchNorm]:
    leaves = jax.tree.leaves(model, is_leaf=is_batch_norm)
    if any(isinstance(leaf, eqx.nn.BatchNorm) for leaf in leaves):
        raise TypeError(
            f"{tool} adapts jbn.equinox.BatchNorm layers; this model has an eqx.nn.BatchNorm: "
            "convert it first with jbn.equinox.convert(model, state)"
        )
    found = [leaf for leaf in leaves if isinstance(leaf, BatchNorm)]
    checks.found_batch_norms(len(found), tool, "jbn.equinox.BatchNorm layers")
    return found


def with_field(node: BatchNorm, name: str, value: Any) -> BatchNorm:
    """``node`` with its static field ``name`` (not a leaf eqx.tree_at can reach) set to ``value``."""
    new = object.__new__(BatchNorm)
    for field in dataclasses.fields(node):
        object.__setattr__(new, field.name, getattr(node, field.name))
    object.__setattr__(new, name, value)
    return new


def _memories(
    state: eqx.nn.State, bns: list[BatchNorm], streams: list[Stream | None]
) -> eqx.nn.State:
    """``state`` with each layer's memory started from its running statistics (None: removed)."""
    values, keys = state.tree_flatten()
    new = dict(zip(keys, values, strict=True))
    for bn, stream in zip(bns, streams, strict=True):
        stored = state.get(bn.state_index)
        kept = {k: v for k, v in stored.items() if k not in MEMORY}
        if stream is not None:
            kept |= start_memory(stored["mean"], stored["var"], stream)
        new[bn.state_index.marker] = kept
    return eqx.nn.State.tree_unflatten(keys, [new[k] for k in keys])


def use_stream(model: Any, state: eqx.nn.State, stream: Stream | None) -> tuple[Any, eqx.nn.State]:
    """The model with every ``jbn.equinox.BatchNorm`` in the stream mode, and its state.

    Each layer then normalizes every example with its own statistics pooled
    with a memory of the stream's statistics, counted as ``stream.prior``
    examples, takes the batch (along its ``axis_name``) into the memory, and
    returns the memory updated in the state (:class:`jbn.Stream`), in training
    and inference mode alike; the running statistics are left alone. The memory
    starts from the running statistics; :func:`reset_stream` returns to them,
    and ``use_stream(model, state, None)`` takes the layers out of the mode and
    the memory out of the state::

      >>> import equinox as eqx, jax, jax.numpy as jnp, jbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
      >>> bn, state = jbn.equinox.use_stream(bn, state, jbn.Stream(500.0, 64.0))
      >>> run = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = run(jnp.ones((1, 3)), state)
      >>> state = jbn.equinox.reset_stream(bn, state)

    For a part of a model, use ``eqx.tree_at`` on the model as with
    :func:`jbn.equinox.use_prior`, and this function on the part.

    Args:
      model: any pytree holding ``jbn.equinox.BatchNorm`` layers.
      state: its ``eqx.nn.State`` (not modified).
      stream: a :class:`jbn.Stream`, or None.

    Returns:
      ``(model, state)``: the new model and a new state (with the memory, or without).
    """
    if stream is not None:
        check_stream(stream)
    bns = _batch_norms(model, "jbn.equinox.use_stream")
    new_state = _memories(state, bns, [stream] * len(bns))
    passing = Relay(len(bns))  # the model's: the first batch norm's verdict, to the rest
    index = iter(range(len(bns)))

    def switch(node: Any) -> Any:
        if not isinstance(node, BatchNorm):
            return node
        link = None if stream is None else Link(passing, next(index))
        return with_field(with_field(node, "stream", stream), "stream_link", link)

    return jax.tree.map(switch, model, is_leaf=is_batch_norm), new_state


def reset_stream(model: Any, state: eqx.nn.State) -> eqx.nn.State:
    """The state with the memory of every layer of ``model`` in the stream mode started again.

    Bit for bit what :func:`use_stream` returned, from the running statistics
    (the same structure, so a jitted function keeps its compilation).
    """
    bns = [bn for bn in _batch_norms(model, "jbn.equinox.reset_stream") if bn.stream is not None]
    if not bns:
        raise ValueError(
            "jbn.equinox.reset_stream: no batch norm of the model is in the stream mode "
            "(see jbn.equinox.use_stream)"
        )
    return _memories(state, bns, [bn.stream for bn in bns])
