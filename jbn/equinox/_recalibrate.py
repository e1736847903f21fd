"""Recalibrating the running statistics of an Equinox model's ``jbn.equinox.BatchNorm`` layers.

For the duration, each layer is wrapped by a stateful layer that adds the
exact statistics of its input, over the batch's named axis, to an accumulator
kept in the ``eqx.nn.State`` beside the layer's entry (:mod:`jbn._recalibrate`
does the pooling and the passes).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .. import _checks as checks
from .._recalibrate import accumulate, new_accumulator, recalibrated, run_passes
from ._batch_norm import BatchNorm
from ._forward import Forward, is_batch_norm, vmapped_forward
from ._layer import Layer, Output
from ._state import index_with, state_entry

_TOOL = "jbn.equinox.recalibrate_batch_stats"


class _Layout(NamedTuple):
    """What :func:`jbn._recalibrate.accumulate` reads of a layer: one example, features first."""

    axis: int
    axis_name: Any
    axis_index_groups: None
    unbiased_running_var: bool
    finite_running_stats: bool


class _Collecting(Layer):
    """Wraps a ``jbn.equinox.BatchNorm`` while recalibrating: same outputs, statistics collected."""

    layer: BatchNorm
    acc_index: eqx.nn.StateIndex
    where: str = eqx.field(static=True)

    def __init__(self, layer: BatchNorm, acc_index: eqx.nn.StateIndex, where: str) -> None:
        self.layer, self.acc_index, self.where = layer, acc_index, where

    def _forward(self, x: ArrayLike, state: eqx.nn.State, inference: Any, mask: Any) -> Output:
        layer = self.layer
        if checks.bound_axis_name(layer.axis_name) is None:
            raise ValueError(
                f"{_TOOL}: {self.where} takes the statistics of the whole batch over its "
                f"axis_name={layer.axis_name!r}, which forward does not bind: call the model "
                f"under jax.vmap(model, axis_name={layer.axis_name!r}, in_axes=(0, None), "
                "out_axes=(0, None)) (or pmap / shard_map), as the default forward does"
            )
        running = state.get(layer.state_index)
        y, state = layer(x, state, inference=inference, mask=mask)
        x = jnp.asarray(x)
        mask = checks.mask(mask, x.shape)
        if x.ndim == 1:  # as the layer does: a spatial axis of size 1
            x, mask = x[:, None], None if mask is None else mask[:, None]
        view = _Layout(
            0, layer.axis_name, None, layer.unbiased_running_var, layer.finite_running_stats
        )
        acc = accumulate(state.get(self.acc_index), x, view, mask)
        # The running statistics stay the pass's own; only the accumulator moves on.
        return y, state.set(layer.state_index, running).set(self.acc_index, acc)


@eqx.filter_jit
def _step(forward: Forward, model: Any, state: eqx.nn.State, batch: Any) -> eqx.nn.State:
    """The state after ``forward`` on one batch (compiled once per forward and batch shape)."""
    out = forward(model, state, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State)):
        raise TypeError(
            f"{_TOOL}: forward(model, state, batch) must return (output, state), the "
            f"eqx.nn.State the model returned; got {type(out).__name__}"
        )
    return out[1]


def _written(old: dict[str, jax.Array], acc: Any, n_batches: int) -> dict[str, jax.Array]:
    """A layer's new state entry: statistics and counts from :func:`jbn._recalibrate.recalibrated`."""
    # The step count becomes the number of batches, each channel's the batches it took in.
    new = recalibrated(old, acc, n_batches)
    if "feature_count" in old:
        per_channel = {"mean": old["mean"], "var": old["var"], "count": old["feature_count"]}
        new["feature_count"] = recalibrated(per_channel, acc, n_batches)["count"]
    return new


def recalibrate_batch_stats(
    model: Any,
    state: eqx.nn.State,
    batches: Iterable[Any],
    *,
    forward: Forward | None = None,
    passes: int = 1,
) -> eqx.nn.State:
    """Recomputes the running statistics of every ``jbn.equinox.BatchNorm`` of a model.

    The Equinox counterpart of :func:`jbn.recalibrate_batch_stats`: each layer's
    running ``mean`` and ``var`` become the exact statistics of all the values
    its input took over ``batches`` (each batch weighted by its count, variances
    combined with Chan et al.'s parallel formula, masked values left out), as if
    the data were one batch; the parameters are untouched. The model's mode
    decides what the layers pass on while collecting: in training mode (the
    default) each normalizes with its batch's statistics (one pass suffices); in
    inference mode (``eqx.nn.inference_mode(model)``) with the running statistics
    of the previous pass, so ``passes`` = the depth in batch-norm layers makes
    every layer exact for evaluation::

      >>> import equinox as eqx, jax, jbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
      >>> state = jbn.equinox.recalibrate_batch_stats(bn, state, batches)
      >>> state.get(bn.state_index)["count"]
      Array(4, dtype=int32)

    The counts become the number of batches: ``count`` (the steps) is
    ``len(batches)`` and each channel's ``feature_count`` the batches it took in,
    so further training continues the average as if the statistics were those
    of that many steps. As in training (``finite_running_stats``), a channel
    whose statistics in a batch are not finite leaves that batch out, and one
    without any finite value keeps its statistics. Frozen layers
    (:class:`jbn.equinox.FrozenBatchNorm`) keep theirs; every other entry of the
    state (other stateful layers) is returned as it came. ``forward`` runs under
    ``eqx.filter_jit`` (compiled once per batch shape).

    Args:
      model: any pytree holding ``jbn.equinox.BatchNorm`` layers (convert
        ``eqx.nn.BatchNorm`` layers first with :func:`jbn.equinox.convert`).
      state: the model's ``eqx.nn.State``; it is not modified.
      batches: an iterable of whatever ``forward`` takes; with ``passes > 1``
        it is iterated once per pass (a list, not a generator).
      forward: ``(model, state, batch) -> (output, state)``. It must call the
        batch norms under a map that binds their ``axis_name`` (their statistics
        are those of the batch). Default: ``jax.vmap(model,
        axis_name=<the batch norms' axis_name>, in_axes=(0, None), out_axes=(0,
        None))(batch, state)``; give your own for masks (``(x, mask)`` batches)
        or other arguments.
      passes: how many times to go over ``batches`` (default 1).

    Returns:
      The new state. If anything fails (no batch, a layer that saw no finite
      value), an error is raised and there is none.
    """
    checks.passes(passes)
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"state must be the model's eqx.nn.State, got {type(state).__name__}; create it "
            "with eqx.nn.make_with_state"
        )
    root = type(model).__name__
    layers: dict[Hashable, tuple[str, BatchNorm]] = {}  # by state entry: (first path, layer)
    for path, leaf in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_batch_norm)[0]:
        where = root + jax.tree_util.keystr(path)
        if isinstance(leaf, eqx.nn.BatchNorm):
            raise ValueError(
                f"{_TOOL} recalibrates jbn.equinox.BatchNorm layers; {where} is an "
                "eqx.nn.BatchNorm: convert the model first with jbn.equinox.convert(model, state)"
            )
        if isinstance(leaf, BatchNorm):
            layers.setdefault(leaf.state_index.marker, (where, leaf))
    if not layers:
        raise ValueError(f"model holds no jbn.equinox.BatchNorm layer for {_TOOL} to recalibrate")
    values, keys = state.tree_flatten()  # a copy: state itself stays valid and unchanged
    current = dict(zip(keys, values, strict=True))
    for where, layer in layers.values():
        entry = state_entry(state, layer.state_index, where)
        if not (isinstance(entry, dict) and {"mean", "var", "count"} <= set(entry)):
            raise ValueError(
                f"state's entry for {where} is not a jbn.equinox.BatchNorm's running statistics "
                "(a dict with 'mean', 'var' and 'count'): state must be model's eqx.nn.State"
            )
    # One accumulator per state entry (a layer used twice collects both calls' inputs).
    accs = {m: index_with(None, ("jbn.recalibration", m)) for m in layers}

    def fresh() -> dict[Hashable, Any]:
        return {m: new_accumulator(jnp.asarray(current[m]["mean"])) for m in layers}

    def wrap(node: Any) -> Any:
        if not isinstance(node, BatchNorm):
            return node
        marker = node.state_index.marker
        return _Collecting(layer=node, acc_index=accs[marker], where=layers[marker][0])

    wrapped = jax.tree.map(wrap, model, is_leaf=is_batch_norm)
    forward = forward or vmapped_forward(model, _TOOL)
    collected = fresh()

    def with_accumulators() -> eqx.nn.State:
        markers = [*keys, *(accs[m].marker for m in layers)]
        return eqx.nn.State.tree_unflatten(
            markers, [*(current[k] for k in keys), *collected.values()]
        )

    def begin() -> None:
        collected.update(fresh())

    def one_batch(batch: Any) -> None:
        out = _step(forward, wrapped, with_accumulators(), batch)
        collected.update({m: out.get(accs[m]) for m in layers})

    def finish(n_batches: int) -> list[str]:
        missing = [layers[m][0] for m, acc in collected.items() if not jnp.any(acc["count"] > 0)]
        if not missing:
            for m, acc in collected.items():
                current[m] = _written(current[m], acc, n_batches)
        return missing

    run_passes(batches, passes, begin, one_batch, finish, "forward must call each")
    return eqx.nn.State.tree_unflatten(keys, [current[k] for k in keys])
