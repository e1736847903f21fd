"""The running statistics: their update from a training batch's statistics.

flax's exponential moving average, ``new = momentum * old + (1 - momentum) *
batch``, or torch's cumulative average (``momentum=None``), with torch's
unbiased running variance as an option. Statistics of several groups (ghost
batches) are pooled by count first. A feature that had no unmasked value keeps
its running statistics, and so, by default, does a feature whose batch
statistics are not finite (a NaN or inf in the batch): one bad batch cannot
poison the running statistics for good. ``finite_only=False`` updates them
anyway, as flax and torch do.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._stats import pool_groups, unbiased

Array = jax.Array


def update_running(
    state: Mapping[str, Array],
    mean: Array,
    var: Array,
    n: Array,
    *,
    momentum: ArrayLike | None,
    unbiased_var: bool,
    feature_shape: tuple[int, ...],
    finite_only: bool = True,
) -> dict[str, Array]:
    """New running statistics from a batch's ``(mean, biased var, count)``.

    The batch statistics may carry a leading axis of groups (ghost batches):
    each group's variance is corrected on its own count, then the groups are
    pooled by count (:func:`jbn._stats.pool_groups`; one group pools to itself,
    exactly, since its weight n/n is 1).
    """
    mean, var, n = (lax.stop_gradient(v).reshape((-1,) + feature_shape) for v in (mean, var, n))
    if unbiased_var:
        var = unbiased(var, n)
    mean, var, n = pool_groups(mean, var, n)
    old_mean, old_var = (lax.stop_gradient(state[k]) for k in ("mean", "var"))
    new = dict(state)
    if momentum is None:
        count = state["count"] + 1
        w = 1.0 / count.astype(mean.dtype)
        new_mean = (1.0 - w) * old_mean + w * mean
        new_var = (1.0 - w) * old_var + w * var
        new["count"] = count
    else:
        new_mean = momentum * old_mean + (1.0 - momentum) * mean
        new_var = momentum * old_var + (1.0 - momentum) * var
    # A feature with no unmasked entry anywhere keeps its running statistics,
    # and (finite_only) so does one whose batch statistics are not finite.
    update = n > 0
    if finite_only:
        update = update & jnp.isfinite(mean) & jnp.isfinite(var)
    # A complex running mean stays complex (flax's convention); the variance is real.
    mean_dtype = (
        jnp.result_type(old_mean.dtype, mean.dtype) if jnp.iscomplexobj(mean) else old_mean.dtype
    )
    new["mean"] = jnp.where(update, new_mean, old_mean).astype(mean_dtype)
    new["var"] = jnp.where(update, new_var, old_var).astype(old_var.dtype)
    return new
