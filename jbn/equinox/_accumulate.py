"""Gradient accumulation for Equinox models: :func:`use_accumulation` and :func:`commit_batch_stats`.

:func:`use_accumulation` returns the model with every ``jbn.equinox.BatchNorm``
in the accumulation mode of :func:`jbn.bn_forward` for its training calls, and
the ``eqx.nn.State`` with each layer's empty accumulator (``accum_count``,
``accum_mean``, ``accum_m2``, beside its running statistics).
:func:`commit_batch_stats` applies each layer's one running update with its
own options (:func:`jbn.bn_commit`).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._accumulate import ACCUMULATOR, Accumulate, bn_commit, empty_accumulator
from ._batch_norm import BatchNorm
from ._forward import is_batch_norm
from ._stream import _batch_norms, with_field


def _entries(state: eqx.nn.State, bns: list[BatchNorm], change: Any) -> eqx.nn.State:
    """``state`` with ``change(bn, stored)`` as each layer's entry."""
    values, keys = state.tree_flatten()
    new = dict(zip(keys, values, strict=True))
    for bn in bns:
        new[bn.state_index.marker] = change(bn, state.get(bn.state_index))
    return eqx.nn.State.tree_unflatten(keys, [new[k] for k in keys])


def use_accumulation(model: Any, state: eqx.nn.State, on: bool = True) -> tuple[Any, eqx.nn.State]:
    """The model with every ``jbn.equinox.BatchNorm`` in gradient accumulation (or out), and its state.

    Each layer's training calls then normalize the micro-batch (along its
    ``axis_name``) with its own statistics, with the training backward, leave
    the running statistics alone and add the micro-batch's exact statistics to
    the layer's accumulator in the state (:class:`jbn.Accumulate`); inference
    calls run as usual. :func:`commit_batch_stats` applies one running update
    per layer. ``on=True`` starts empty accumulators; ``on=False`` takes the
    layers out of the mode and the accumulators out of the state::

      >>> import equinox as eqx, jax, jax.numpy as jnp, jbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
      >>> bn, state = jbn.equinox.use_accumulation(bn, state)
      >>> run = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> for micro in jnp.split(x, 4):
      ...     y, state = run(micro, state)
      >>> state = jbn.equinox.commit_batch_stats(bn, state)

    Args:
      model: any pytree holding ``jbn.equinox.BatchNorm`` layers.
      state: its ``eqx.nn.State`` (not modified).
      on: True: into the mode, with empty accumulators; False: out of it.

    Returns:
      ``(model, state)``: the new model and a new state.
    """
    if not isinstance(on, bool):
        raise TypeError(f"on must be a Python bool, got {on!r}")
    bns = _batch_norms(model, "jbn.equinox.use_accumulation")
    for bn in bns if on else ():
        if bn.virtual_batch_size is not None or bn.renorm:
            raise ValueError(
                f"jbn.equinox.use_accumulation: a batch norm has virtual_batch_size="
                f"{bn.virtual_batch_size!r}, renorm={bn.renorm!r}; accumulation normalizes each "
                "micro-batch with its own statistics (the micro-batch is the ghost batch): use "
                "neither"
            )

    def change(bn: BatchNorm, stored: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in stored.items() if k not in ACCUMULATOR}
        if on:
            mean = jnp.asarray(stored["mean"])
            kept |= empty_accumulator(mean.shape, mean.dtype)
        return kept

    mode = Accumulate() if on else None
    new_model = jax.tree.map(
        lambda n: with_field(n, "accumulation", mode) if isinstance(n, BatchNorm) else n,
        model,
        is_leaf=is_batch_norm,
    )
    return new_model, _entries(state, bns, change)


def commit_batch_stats(model: Any, state: eqx.nn.State) -> eqx.nn.State:
    """The state with every batch norm's accumulated micro-batches committed.

    Each layer of ``model`` in the accumulation mode (:func:`use_accumulation`)
    updates its running statistics as one training step on the concatenation
    of its accumulated micro-batches would (the debiased average, or the
    cumulative one with ``momentum=None``, with the layer's own
    ``unbiased_running_var`` and ``finite_running_stats``; :func:`jbn.bn_commit`),
    counts it as one step, and empties its accumulator; a layer with nothing
    accumulated is left unchanged. Works under ``jax.jit``.

    Args:
      model: the model in the accumulation mode.
      state: its ``eqx.nn.State`` with the accumulators (not modified).

    Returns:
      The new state.
    """
    bns = [
        bn
        for bn in _batch_norms(model, "jbn.equinox.commit_batch_stats")
        if bn.accumulation is not None
    ]
    if not bns:
        raise ValueError(
            "jbn.equinox.commit_batch_stats: no batch norm of the model is in the accumulation "
            "mode: use (model, state) = jbn.equinox.use_accumulation(model, state) first"
        )

    def change(bn: BatchNorm, stored: dict[str, Any]) -> dict[str, Any]:
        running = {k: stored[k] for k in ("mean", "var", *ACCUMULATOR) if k in stored}
        running["count"] = stored.get("feature_count", stored["count"])
        new = bn_commit(
            running,
            momentum=bn.momentum,
            unbiased_running_var=bn.unbiased_running_var,
            finite_running_stats=bn.finite_running_stats,
            debias=bn.momentum is not None,
        )
        took = jnp.any(jnp.asarray(stored["accum_count"]) > 0)  # a step, as in training
        out = {**stored, **{k: new[k] for k in ("mean", "var", *ACCUMULATOR)}}
        out["count"] = stored["count"] + took.astype(jnp.asarray(stored["count"]).dtype)
        if "feature_count" in stored:
            out["feature_count"] = new["count"]
        return out

    return _entries(state, bns, change)
