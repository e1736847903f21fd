"""Gradient accumulation: micro-batches that commit one running update.

When a batch is split into k micro-batches whose gradients are summed (e.g.
``optax.MultiSteps`` or a ``lax.scan``), training mode would update the running
statistics k times per optimizer step, each time with one micro-batch's
statistics. In the accumulation mode of :func:`jbn.bn_forward`
(``train=jbn.Accumulate()``) each micro-batch is normalized with its own
statistics, with the training-mode backward, and the running statistics are
left alone: the micro-batch's exact ``(count, mean, M2)`` is added to an
accumulator in the state by Chan's formula (:func:`jbn._stats.combine`), so
masks and unequal sizes are exact. :func:`bn_commit` then applies one running
update (:func:`jbn._running.update_running`) with the statistics of all the
accumulated values, as one training step on the concatenated batch would, and
empties the accumulator (torchgpipe's ``DeferredBatchNorm``).

The accumulator lives in the state as ``accum_count`` (values per feature),
``accum_mean`` and ``accum_m2`` (the sum of squared deviations, M2 = n σ²), each
of the feature shape: everything any running-update convention needs. The
unbiased variance uses the total count n (n / (n - 1)); the cumulative and
debiased averages count the commit as one batch; a non-finite micro-batch
makes M2 non-finite for good (Chan's formula keeps a NaN or inf), so with
``finite_running_stats`` the commit skips that feature, as the step on the
concatenated batch, which holds the same non-finite value, would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _checks as checks
from ._running import update_running
from ._stats import combine, compute_dtype, real_dtype
from ._stream import split_memory
from ._tree import split_entries

Array = jax.Array

# The state entries of the accumulator, each of the feature shape.
ACCUMULATOR = ("accum_count", "accum_mean", "accum_m2")


@dataclasses.dataclass(frozen=True)
class Accumulate:
    """The accumulation mode of :func:`jbn.bn_forward` (its ``train`` argument).

    Each micro-batch is normalized with its own statistics, with the same
    analytic backward as ``train=True``; ``mean``, ``var`` and ``count`` are
    left untouched, and the micro-batch's exact statistics are added to an
    accumulator in the state (``accum_count``, ``accum_mean``, ``accum_m2``,
    created when absent). :func:`jbn.bn_commit` then applies one running update,
    as if the accumulated micro-batches were one batch::

      >>> import jax, jax.numpy as jnp, jbn
      >>> params, state = jbn.bn_init(3)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> for micro in jnp.split(x, 4):      # 4 micro-batches of 2
      ...     y, state = jbn.bn_forward(params, state, micro, jbn.Accumulate())
      >>> state = jbn.bn_commit(state, momentum=0.9)
      >>> _, full = jbn.bn_forward(params, jbn.bn_init(3)[1], x, True, momentum=0.9)
      >>> bool(jnp.allclose(state["mean"], full["mean"]))
      True

    Statistics sync over ``axis_name`` as in training, so k micro-batches on
    each of P devices accumulate the statistics of all k·P. Ghost batches
    (``virtual_batch_size``) and ``renorm`` are training-only: the micro-batch
    already is the group that is normalized on its own.
    """


def split_accumulator(state: Any) -> tuple[Any, dict[str, Any]]:
    """``state`` as ``(the rest, accumulator)``: the entries of :data:`ACCUMULATOR` apart."""
    return split_entries(state, ACCUMULATOR)


def empty_accumulator(shape: tuple[int, ...], dtype: Any) -> dict[str, Array]:
    """An empty accumulator of the feature ``shape``, in (at least) float32 ``dtype``."""
    cd = compute_dtype(dtype)
    zeros = jnp.zeros(shape, real_dtype(cd))
    return {"accum_count": zeros, "accum_mean": jnp.zeros(shape, cd), "accum_m2": zeros}


def start_accumulation(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with an empty accumulator (any accumulator in it is replaced).

    :func:`jbn.bn_forward` in the accumulation mode creates the accumulator when
    it is absent; start it before a ``jax.lax.scan`` over micro-batches so that
    the carry keeps one structure.

    Args:
      state: running statistics ``{"mean", "var", ...}`` (see :func:`jbn.bn_init`).

    Returns:
      A new state with ``accum_count``, ``accum_mean`` and ``accum_m2`` (zeros).
    """
    rest, _ = split_accumulator(_mapping(state))
    if "mean" not in rest:
        raise ValueError("state is missing 'mean': pass the running statistics")
    mean = jnp.asarray(rest["mean"])
    return {**rest, **empty_accumulator(mean.shape, mean.dtype)}


def check_accumulator(
    accumulator: Mapping[str, Any], feature_shape: tuple[int, ...], needs: str
) -> dict[str, Array]:
    """The accumulator's entries, all or none, each of the feature shape."""
    hint = "jbn.start_accumulation creates them"
    return checks.state_entries(accumulator, ACCUMULATOR, "accumulator", hint, feature_shape, needs)


def accumulate(
    accumulator: Mapping[str, Array], mean: Array, var: Array, n: Array
) -> dict[str, Array]:
    """The accumulator with a micro-batch's ``(mean, biased var, count)`` added (Chan).

    The result keeps the accumulator's dtypes (a fixed ``lax.scan`` carry).
    """
    acc_n, acc_mean, acc_m2 = (lax.stop_gradient(accumulator[k]) for k in ACCUMULATOR)
    rd = acc_n.dtype
    mean_b, var_b, n_b = (lax.stop_gradient(v).reshape(acc_n.shape) for v in (mean, var, n))
    n_b = n_b.astype(rd)
    batch = (n_b, mean_b.astype(acc_mean.dtype), var_b.astype(rd) * n_b)
    total, new_mean, m2 = combine((acc_n, acc_mean, acc_m2), batch)
    return {
        "accum_count": total.astype(rd),
        "accum_mean": new_mean.astype(acc_mean.dtype),
        "accum_m2": m2.astype(rd),
    }


def bn_commit(
    state: Mapping[str, Any],
    *,
    momentum: float | ArrayLike | None = 0.99,
    unbiased_running_var: bool = False,
    finite_running_stats: bool = True,
    debias: bool = False,
) -> dict[str, Array]:
    """One running update from the accumulated micro-batches, then an empty accumulator.

    The running statistics become what one ``bn_forward(..., train=True)`` on
    the concatenation of the micro-batches accumulated with
    ``train=jbn.Accumulate()`` would give, with the same options: flax's EMA,
    the cumulative average (``momentum=None``, the commit counts as one batch),
    Equinox's debiased average (``debias``), torch's unbiased running variance
    (n / (n - 1) with n all the accumulated values). The accumulator is emptied
    and kept, so the state keeps its structure; a commit with nothing
    accumulated changes nothing.

    Args:
      state: a state holding an accumulator (``accum_count``, ``accum_mean``,
        ``accum_m2``), see :class:`jbn.Accumulate` and :func:`jbn.start_accumulation`.
      momentum: as in :func:`jbn.bn_forward`; None: cumulative average (needs
        ``state["count"]``).
      unbiased_running_var: as in :func:`jbn.bn_forward`.
      finite_running_stats: as in :func:`jbn.bn_forward`: a feature with a
        non-finite accumulated micro-batch keeps its running statistics.
      debias: as in :func:`jbn.bn_forward` (needs ``state["count"]``).

    Returns:
      The new state: the running statistics updated, the accumulator empty.
    """
    checks.momentum(momentum)
    unbiased_running_var = checks.python_bool(unbiased_running_var, "unbiased_running_var")
    finite_running_stats = checks.python_bool(finite_running_stats, "finite_running_stats")
    debias = checks.python_bool(debias, "debias")
    rest, accumulator = split_accumulator(_mapping(state))
    if not accumulator:
        raise ValueError(
            "jbn.bn_commit: state has no accumulator (accum_count, accum_mean, accum_m2): run "
            "jbn.bn_forward with train=jbn.Accumulate() on the micro-batches first, or start "
            "one with jbn.start_accumulation(state)"
        )
    running, memory = split_memory(rest)  # a stream's memory is kept as it is
    if "mean" not in running:
        raise ValueError("jbn.bn_commit: state is missing 'mean': pass the running statistics")
    feature_shape = jnp.shape(running["mean"])
    needs = "the running statistics"
    running = checks.state(running, feature_shape, needs, need_count=momentum is None or debias)
    accumulator = check_accumulator(accumulator, feature_shape, needs)
    n = accumulator["accum_count"]
    var = accumulator["accum_m2"] / jnp.maximum(n, 1)
    new = update_running(
        running,
        accumulator["accum_mean"],
        var,
        n,
        momentum=momentum,
        unbiased_var=unbiased_running_var,
        feature_shape=feature_shape,
        finite_only=finite_running_stats,
        debias=debias,
    )
    empty = {k: jnp.zeros_like(v) for k, v in accumulator.items()}
    return {**new, **memory, **empty}


def _mapping(state: Any) -> Mapping[str, Any]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of running statistics, got {type(state).__name__}")
    return state
