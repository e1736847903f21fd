"""``jbn.equinox.convert``: swap every ``eqx.nn.BatchNorm`` of a model for jbn's."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import _checks as checks
from ._batch_norm import BatchNorm
from ._forward import is_batch_norm
from ._state import index_with, state_entry

# Step count given to running statistics converted from an Equinox mode="ema" layer,
# whose state has no step counter: large enough that momentum**count is 0 in float32
# for any momentum <= 0.9999, so the debiasing (see BatchNorm) is off.
_WARM_COUNT = 2**20


def _is_eqx_bn(node: Any) -> bool:
    return isinstance(node, eqx.nn.BatchNorm)


def _is_leaf(node: Any) -> bool:
    return _is_eqx_bn(node) or isinstance(node, eqx.nn.StateIndex)


def _checked_shape(value: Any, layer: eqx.nn.BatchNorm, where: str) -> None:
    if jnp.shape(value) != (layer.input_size,):
        raise ValueError(
            f"state holds running statistics of shape {jnp.shape(value)} for model's {where}, "
            f"which has input_size={layer.input_size}: state must be model's eqx.nn.State, not "
            "another model's"
        )


def _converted_stats(
    layer: eqx.nn.BatchNorm, state: eqx.nn.State, allow_ema: bool, where: str
) -> dict[str, jax.Array]:
    # Equinox types each mode's state indices as optional: a layer has its mode's only.
    if layer.mode == "batch":
        assert layer.batch_counter is not None and layer.batch_state_index is not None
        t = state_entry(state, layer.batch_counter, where)
        hidden_mean, hidden_var = state_entry(state, layer.batch_state_index, where)
        _checked_shape(hidden_mean, layer, where)
        decay = jnp.asarray(layer.momentum, hidden_mean.dtype) ** jnp.asarray(t, hidden_mean.dtype)
        weight = jnp.where(t == 0, 1.0, 1.0 - decay)
        # Equinox's hidden variance starts at 1 (weight m^t): remove it, keep the average.
        mean = hidden_mean / weight
        var = jnp.where(t == 0, hidden_var, (hidden_var - decay) / weight)
        count = jnp.asarray(t, jnp.int32)
        dtype = hidden_mean.dtype
    else:
        if not allow_ema:
            raise ValueError(
                f"{where} is an eqx.nn.BatchNorm with mode='ema' (Equinox's default), which "
                "normalizes training batches with a running average; jbn normalizes them with "
                "the batch statistics (mode='batch'), so training changes after conversion. "
                "Pass allow_ema=True to convert anyway (the running statistics are kept)"
            )
        assert layer.ema_first_time_index is not None and layer.ema_state_index is not None
        first_time = state_entry(state, layer.ema_first_time_index, where)
        ema_mean, ema_var = state_entry(state, layer.ema_state_index, where)
        _checked_shape(ema_mean, layer, where)
        mean = jnp.where(first_time, 0.0, ema_mean)
        var = jnp.where(first_time, 1.0, ema_var)
        count = jnp.where(first_time, 0, _WARM_COUNT).astype(jnp.int32)
        dtype = ema_mean.dtype
    return {
        "mean": mean.astype(dtype),
        "var": jnp.maximum(var, 0.0).astype(dtype),
        "count": count,
        "feature_count": jnp.broadcast_to(count, mean.shape),
    }


def count_batch_norms(model: Any) -> int:
    """The ``eqx.nn.BatchNorm`` and ``jbn.equinox.BatchNorm`` layers of ``model``."""
    return sum(map(is_batch_norm, jax.tree.leaves(model, is_leaf=is_batch_norm)))


def convert(
    model: Any, state: eqx.nn.State, *, allow_ema: bool = False, **options: Any
) -> tuple[Any, eqx.nn.State]:
    """Replaces every ``eqx.nn.BatchNorm`` of a model with :class:`jbn.equinox.BatchNorm`.

    Walks any pytree (nested modules, lists, ``eqx.nn.Sequential``), carrying
    over each layer's ``weight``, ``bias``, ``inference`` flag, settings and running
    statistics; every other state entry is kept. For ``mode="batch"`` layers the
    converted model gives the same training outputs, loss and gradients on every
    step. For ``mode="ema"`` layers (``allow_ema=True``) it does on the first
    training step of a fresh state only: Equinox normalizes each later training
    batch with ``momentum * running + (1 - momentum) * batch`` statistics (mean
    and variance alike) and jbn with the batch's own. Equinox ``mode="batch"``
    running statistics become jbn's debiased averages: the mean is unchanged and the
    variance loses Equinox's initialization bias ``m^t / (1 - m^t)`` (see
    :class:`BatchNorm`), so inference outputs agree once ``m^t`` is negligible and
    are more accurate before.

    Args:
      model: any pytree containing ``eqx.nn.BatchNorm`` layers.
      state: its ``eqx.nn.State``.
      allow_ema: also convert ``mode="ema"`` layers (Equinox's default), keeping
        their running statistics as fully warmed-up averages; their training
        outputs match Equinox's on a fresh state's first step only and change
        from the second (Equinox mixes the running statistics into the batch's;
        jbn normalizes with the batch statistics).
      **options: keyword options for every new layer, e.g. ``residual="output"``.

    Returns:
      ``(new_model, new_state)``; ``state`` is not modified.
    """
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"state must be the model's eqx.nn.State, got {type(state).__name__}; create it "
            "with eqx.nn.make_with_state"
        )
    bad = sorted(set(options) & {"input_size", "axis_name", "eps", "channelwise_affine"})
    if bad:
        raise ValueError(f"options {bad} are taken from each converted layer; leave them out")
    checks.found_batch_norms(
        count_batch_norms(model),
        "jbn.equinox.convert",
        "eqx.nn.BatchNorm and jbn.equinox.BatchNorm layers",
    )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_leaf)
    prefix = type(model).__name__
    new_leaves = []
    for path, leaf in leaves:
        where = prefix + jax.tree_util.keystr(path)
        if isinstance(leaf, eqx.nn.StateIndex):
            new_leaves.append(index_with(state_entry(state, leaf, where), leaf.marker))
        elif _is_eqx_bn(leaf):
            running = _converted_stats(leaf, state, allow_ema, where)
            settings = dict(
                eps=leaf.eps,
                channelwise_affine=leaf.channelwise_affine,
                momentum=leaf.momentum,
                inference=leaf.inference,
                dtype=running["mean"].dtype,
            )
            settings.update(options)
            layer = BatchNorm(leaf.input_size, leaf.axis_name, **settings)
            layer = eqx.tree_at(
                lambda b: (b.weight, b.bias, b.state_index),
                layer,
                (leaf.weight, leaf.bias, index_with(running, where + ".state_index")),
                is_leaf=lambda n: n is None,
            )
            new_leaves.append(layer)
        else:
            new_leaves.append(leaf)
    with_inits = jax.tree_util.tree_unflatten(treedef, new_leaves)
    new_state = eqx.nn.State(with_inits)
    return eqx.nn.delete_init_state(with_inits), new_state
