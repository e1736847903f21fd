"""Recalibrating running statistics: exact population statistics over many batches.

The batch-norm modules know nothing about this: recalibration drives them from
outside (:mod:`jbn.linen` with an interceptor, :mod:`jbn.nnx` with a graph walk),
and both use what is here: an accumulator per layer that adds each batch's exact
statistics with Chan et al.'s formula (:func:`jbn._stats.combine`), so the result
is the mean and variance of all the batches' values together (each batch
weighted by its count), not the average of the batch variances; and the loop
over passes and batches, written once in :func:`run_passes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks as checks
from ._batch_norm import bn_stats
from ._stats import combine, unbiased


def new_accumulator(mean: jax.Array) -> dict[str, jax.Array]:
    """An empty accumulator for a layer whose running mean is ``mean``.

    ``count`` is the number of values per feature, ``batches`` the number of
    batches that each feature took in.
    """
    zeros = jnp.zeros(mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
    return {"count": zeros, "mean": zeros, "m2": zeros, "var": zeros, "batches": zeros}


def accumulate(acc: Mapping[str, jax.Array], x: jax.Array, layer: Any, mask: Any) -> dict:
    """Adds the batch ``x`` that ``layer`` (a jbn batch norm) sees to the accumulator.

    ``acc["var"]`` is the variance the layer stores: M2/n, with Bessel's
    correction if the layer has ``unbiased_running_var``. As in training
    (``finite_running_stats``, on by default), a feature whose statistics in
    this batch are not finite (a NaN or inf in it) skips the batch: it adds no
    value, so the other batches' statistics of that feature stay exact.
    """
    batch = bn_stats(
        x,
        axis=layer.axis,
        mask=mask,
        axis_name=checks.bound_axis_name(layer.axis_name),
        axis_index_groups=layer.axis_index_groups,
    )
    mean_b, var_b, n_b = (lax.stop_gradient(v).astype(acc["mean"].dtype) for v in batch)
    if getattr(layer, "finite_running_stats", True):
        # Zeros, not just a zero count: Chan's formula weighs the batch's mean by
        # n_b / n, and NaN * 0 is NaN.
        counted = (n_b > 0) & jnp.isfinite(mean_b) & jnp.isfinite(var_b)
        mean_b, var_b, n_b = (jnp.where(counted, v, 0) for v in (mean_b, var_b, n_b))
    n, mean, m2 = combine((acc["count"], acc["mean"], acc["m2"]), (n_b, mean_b, var_b * n_b))
    var = m2 / jnp.maximum(n, 1)
    if layer.unbiased_running_var:
        var = unbiased(var, n)
    batches = acc["batches"] + (n_b > 0)
    return {"count": n, "mean": mean, "m2": m2, "var": var, "batches": batches}


def recalibrated(old: Mapping[str, Any], acc: Mapping[str, jax.Array], n_batches: int) -> dict:
    """A layer's new running statistics from its accumulator.

    A feature that never had a (finite) value keeps its statistics; a cumulative
    layer (with ``count``) gets ``count`` = the number of batches: ``n_batches``
    for a scalar count, the batches each feature took in for a count per feature.
    """
    new = dict(old)
    seen = acc["count"] > 0
    for key in ("mean", "var"):
        new[key] = jnp.where(seen, acc[key], old[key]).astype(jnp.asarray(old[key]).dtype)
    if "count" in old and old["count"] is not None:
        count = jnp.asarray(old["count"])
        if count.ndim == 0:
            new["count"] = jnp.asarray(n_batches, count.dtype)
        else:
            batches = jnp.where(seen, acc["batches"], count).astype(count.dtype)
            new["count"] = jnp.broadcast_to(batches, count.shape)
    return new


def run_passes(
    batches: Iterable[Any],
    passes: int,
    begin: Callable[[], None],
    step: Callable[[Any], None],
    finish: Callable[[int], list[str]],
    not_recalibrated: str,
) -> None:
    """The loop both frontends share: per pass, fresh accumulators, every batch, write back.

    ``finish(n_batches)`` writes the pass's statistics and returns the names of
    the layers that saw no value (nothing is written then).
    """
    checks.passes(passes)
    if passes > 1 and isinstance(batches, Iterator):
        raise ValueError(
            "batches is an iterator, which yields no batch on pass 2: with passes > 1 give a "
            "list or another re-iterable, not a generator"
        )
    for p in range(passes):
        begin()
        n_batches = 0
        for batch in batches:
            step(batch)
            n_batches += 1
        if n_batches == 0:
            raise ValueError(
                "batches yielded no batch"
                + (
                    f" on pass {p + 1}: with passes > 1 give a list or another re-iterable, "
                    "not a generator"
                    if p
                    else ""
                )
            )
        missing = finish(n_batches)
        if missing:
            raise ValueError(
                f"these batch-norm layers were not recalibrated: {missing}. {not_recalibrated}; "
                "each needs at least one unmasked, finite value (a feature whose batch "
                "statistics are NaN or inf skips that batch)"
            )
