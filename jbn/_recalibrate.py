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
    """An empty accumulator for a layer whose running mean is ``mean``."""
    zeros = jnp.zeros(mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
    return {"count": zeros, "mean": zeros, "m2": zeros, "var": zeros}


def accumulate(acc: Mapping[str, jax.Array], x: jax.Array, layer: Any, mask: Any) -> dict:
    """Adds the batch ``x`` that ``layer`` (a jbn batch norm) sees to the accumulator.

    ``acc["var"]`` is the variance the layer stores: M2/n, with Bessel's
    correction if the layer has ``unbiased_running_var``.
    """
    batch = bn_stats(
        x,
        axis=layer.axis,
        mask=mask,
        axis_name=checks.bound_axis_name(layer.axis_name),
        axis_index_groups=layer.axis_index_groups,
    )
    mean_b, var_b, n_b = (lax.stop_gradient(v).astype(acc["mean"].dtype) for v in batch)
    n, mean, m2 = combine((acc["count"], acc["mean"], acc["m2"]), (n_b, mean_b, var_b * n_b))
    var = m2 / jnp.maximum(n, 1)
    if layer.unbiased_running_var:
        var = unbiased(var, n)
    return {"count": n, "mean": mean, "m2": m2, "var": var}


def recalibrated(old: Mapping[str, Any], acc: Mapping[str, jax.Array], n_batches: int) -> dict:
    """A layer's new running statistics from its accumulator.

    A feature that never had a value keeps its statistics; a cumulative layer
    (with ``count``) gets ``count`` = the number of batches.
    """
    new = dict(old)
    seen = acc["count"] > 0
    for key in ("mean", "var"):
        new[key] = jnp.where(seen, acc[key], old[key]).astype(jnp.asarray(old[key]).dtype)
    if "count" in old and old["count"] is not None:
        count = jnp.asarray(old["count"])
        new["count"] = jnp.full(count.shape, n_batches, count.dtype)
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
                f"these batch-norm layers were not recalibrated: {missing}. {not_recalibrated}"
            )
