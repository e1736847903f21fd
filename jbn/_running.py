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
    debias: bool = False,
) -> dict[str, Array]:
    """New running statistics from a batch's ``(mean, biased var, count)``.

    The batch statistics may carry a leading axis of groups (ghost batches):
    each group's variance is corrected on its own count, then the groups are
    pooled by count (:func:`jbn._stats.pool_groups`; one group pools to itself,
    exactly, since its weight n/n is 1).

    ``state["count"]`` (needed for ``momentum=None`` and ``debias``) counts the
    updates of each feature: a feature whose update is skipped keeps its
    statistics and its count, so the cumulative average is the mean of the
    batches it counted, and a debiased average starts from its first counted
    batch (the initial mean 0 and variance 1 get no weight). A scalar count (a
    checkpoint from before per-feature counts) is broadcast to the feature shape.

    Args:
      state: ``{"mean", "var"}`` of ``feature_shape``, plus ``"count"`` (int) for
        ``momentum=None`` or ``debias``.
      mean, var, n: the batch's per-feature statistics, each of ``feature_shape``
        or with a leading axis of groups.
      momentum: the decay m of ``new = m * old + (1 - m) * batch``; None: the
        cumulative average ``old + (batch - old) / count``.
      unbiased_var: store the variance with Bessel's correction.
      feature_shape: the shape of the running statistics.
      finite_only: skip features whose batch statistics are not finite.
      debias: Equinox's zero-debiased average: at a feature's t-th update the
        decay is (m - m^t) / (1 - m^t) (0 at t = 1), so the running value is
        Σ m^(t-i) s_i (1 - m) / (1 - m^t) over the batches it counted.

    Returns:
      The new ``state`` (same keys; ``"count"`` of ``feature_shape``).
    """
    mean, var, n = (lax.stop_gradient(v).reshape((-1,) + feature_shape) for v in (mean, var, n))
    if unbiased_var:
        var = unbiased(var, n)
    mean, var, n = pool_groups(mean, var, n)
    old_mean, old_var = (lax.stop_gradient(state[k]) for k in ("mean", "var"))
    # A feature with no unmasked entry anywhere keeps its running statistics,
    # and (finite_only) so does one whose batch statistics are not finite.
    update = n > 0
    if finite_only:
        update = update & jnp.isfinite(mean) & jnp.isfinite(var)
    new = dict(state)
    if momentum is None or debias:
        old_count = jnp.broadcast_to(state["count"], feature_shape)
        count = old_count + update.astype(old_count.dtype)
        new["count"] = count
        t = jnp.maximum(count, 1).astype(mean.real.dtype)
        if momentum is None:
            decay = 1.0 - 1.0 / t
        else:
            m = jnp.asarray(momentum, t.dtype)
            m_t = m**t
            # m = 1 keeps the statistics (no update), as an undebiased m = 1 does.
            decay = jnp.where(m_t == 1.0, m, (m - m_t) / jnp.where(m_t == 1.0, 0.5, 1.0 - m_t))
    else:
        decay = momentum
    new_mean = decay * old_mean + (1.0 - decay) * mean
    new_var = decay * old_var + (1.0 - decay) * var
    # A complex running mean stays complex (flax's convention); the variance is real.
    mean_dtype = (
        jnp.result_type(old_mean.dtype, mean.dtype) if jnp.iscomplexobj(mean) else old_mean.dtype
    )
    new["mean"] = jnp.where(update, new_mean, old_mean).astype(mean_dtype)
    new["var"] = jnp.where(update, new_var, old_var).astype(old_var.dtype)
    return new
