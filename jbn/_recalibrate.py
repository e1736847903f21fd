"""Recalibrating running statistics: exact population statistics over many batches.

Each jbn batch-norm layer that finds an accumulator next to its running
statistics adds the exact statistics of its input batch (:func:`jbn.bn_stats`)
to it with the parallel-variance formula of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,   δ = μ_b - μ_a,   μ = μ_a + δ n_b / n,
    M2 = M2_a + M2_b + δ² n_a n_b / n,   var = M2 / n,

so the result is the mean and variance of all the batches' values together
(each batch weighted by its count), not the average of the batch variances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from ._batch_norm import bn_stats

# The accumulator's name inside a layer's batch_stats while recalibrating.
ACCUMULATOR = "recalibration"

NOT_MUTABLE = (
    "jbn.recalibrate_batch_stats needs the updated batch_stats back: apply_fn must pass "
    "mutable=['batch_stats'] and return (output, updates), e.g. "
    "apply_fn=lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])"
)


def new_accumulator(mean: jax.Array) -> dict[str, jax.Array]:
    """An empty accumulator for a layer whose running mean is ``mean``."""
    dtype = jnp.promote_types(mean.dtype, jnp.float32)
    zeros = jnp.zeros(mean.shape, dtype)
    return {"count": zeros, "mean": zeros, "m2": zeros, "var": zeros}


def accumulate(
    acc: Mapping[str, jax.Array],
    x: jax.Array,
    *,
    axis: Any,
    mask: Any,
    axis_name: Any,
    axis_index_groups: Any,
    unbiased: bool,
) -> dict[str, jax.Array]:
    """Adds the batch ``x`` to the accumulator (Chan et al.'s parallel formula).

    ``acc["var"]`` is the variance the layer stores: M2/n, or M2/(n-1) with
    ``unbiased`` (``unbiased_running_var``).
    """
    mean_b, var_b, n_b = (
        lax.stop_gradient(v).astype(acc["mean"].dtype)
        for v in bn_stats(
            x, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
        )
    )
    n_a, mean_a, m2_a = acc["count"], acc["mean"], acc["m2"]
    n = n_a + n_b
    n_safe = jnp.maximum(n, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n_safe)
    m2 = m2_a + var_b * n_b + delta * delta * (n_a * (n_b / n_safe))
    var = m2 / (jnp.maximum(n - 1, 1) if unbiased else n_safe)
    return {"count": n, "mean": mean, "m2": m2, "var": var}


def bound_axis_name(axis_name: Any) -> Any:
    """``axis_name`` if it is bound here (pmap, shard_map, vmap), else None.

    An evaluation-mode apply often runs outside the mapped function it trains in.
    """
    if axis_name is None:
        return None
    try:
        lax.axis_size(axis_name)
    except NameError:
        return None
    return axis_name


def _find_layers(tree: Mapping, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the dicts in a batch_stats tree that hold a layer's 'mean' and 'var'."""
    if "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping):
        return [path]
    return [
        p
        for key, sub in tree.items()
        if isinstance(sub, Mapping) and key != ACCUMULATOR
        for p in _find_layers(sub, path + (key,))
    ]


def _get(tree: Mapping, path: tuple[str, ...]) -> Mapping:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of ``tree`` with the dict at ``path`` replaced (copies along the path only)."""
    if not path:
        return value
    tree = dict(tree)
    tree[path[0]] = _set(tree[path[0]], path[1:], value)
    return tree


def _updated_stats(out: Any) -> dict:
    if not (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[1], Mapping)
        and "batch_stats" in out[1]
    ):
        raise TypeError(
            "apply_fn must return (output, updates) with updates['batch_stats'], as "
            f"model.apply(..., mutable=['batch_stats']) does; got {type(out).__name__}. {NOT_MUTABLE}"
        )
    return flax.core.unfreeze(out[1]["batch_stats"])


def recalibrate_batch_stats(
    apply_fn: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    passes: int = 1,
) -> dict[str, Any]:
    """Recomputes the running statistics of every ``jbn.BatchNorm`` from data.

    The running mean and variance of each layer become the exact statistics of
    all the values its input took over ``batches`` (each batch weighted by its
    count, variances combined with Chan et al.'s parallel formula), as if the
    whole data set were one batch. Parameters are untouched. Use it after
    transfer learning to new data, after averaging weights (SWA), or when the
    running averages lag behind the weights.

    ``apply_fn(variables, batch)`` runs the model and returns ``(output,
    updates)`` with ``updates["batch_stats"]``, e.g.
    ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``. Its
    mode decides what each layer passes on while the statistics are collected:

    * training mode: every layer normalizes with its batch's statistics (the
      usual recipe, torch's ``update_bn``); one pass suffices.
    * evaluation mode (``train=False``, still ``mutable=["batch_stats"]``): every
      layer normalizes with the running statistics of the previous pass, so
      after pass k the first k layers in depth order have exactly the statistics
      of their inputs at evaluation; ``passes`` = the depth in batch-norm layers
      makes all of them exact.

    Layers normalize as usual but leave their running statistics alone while
    collecting; a cumulative layer (``momentum=None``) gets ``count`` = the number
    of batches. ``apply_fn`` is traced under :func:`jax.jit` (once per batch shape).

    Args:
      apply_fn: ``(variables, batch) -> (output, updates)``, see above.
      variables: the model's variables with a ``"batch_stats"`` collection.
      batches: an iterable of whatever ``apply_fn`` takes as its second argument;
        with ``passes > 1`` it is iterated once per pass (a list, not a
        generator).
      passes: how many times to go over ``batches`` (default 1).

    Returns:
      ``variables`` with new ``"batch_stats"``; every other collection is the same
      object as before.
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError(
            "variables must be a model's variables with a 'batch_stats' collection, got "
            + (
                f"collections {sorted(variables)}"
                if isinstance(variables, Mapping)
                else type(variables).__name__
            )
        )
    others = {k: v for k, v in variables.items() if k != "batch_stats"}
    stats = flax.core.unfreeze(variables["batch_stats"])
    layers = _find_layers(stats)
    if not layers:
        raise ValueError(
            "variables['batch_stats'] holds no batch-norm layer (a dict with 'mean' and 'var')"
        )

    @jax.jit
    def step(others, stats, batch):
        return _updated_stats(apply_fn({**others, "batch_stats": stats}, batch))

    for p in range(passes):
        current = stats
        for path in layers:
            layer = {k: v for k, v in _get(stats, path).items() if k != ACCUMULATOR}
            current = _set(
                current, path, {**layer, ACCUMULATOR: new_accumulator(jnp.asarray(layer["mean"]))}
            )
        n_batches = 0
        for batch in batches:
            current = step(others, current, batch)
            n_batches += 1
        if n_batches == 0:
            raise ValueError(
                "batches yielded no batch"
                + (
                    f" on pass {p + 1}: with passes > 1 give a list or another re-iterable, not a generator"
                    if p
                    else ""
                )
            )
        missing = []
        for path in layers:
            old = _get(stats, path)
            acc = _get(current, path).get(ACCUMULATOR)
            if acc is None or not bool(jnp.any(acc["count"] > 0)):
                missing.append("/".join(path))
                continue
            new = {k: v for k, v in old.items() if k != ACCUMULATOR}
            seen = acc["count"] > 0  # a feature that never had a value keeps its statistics
            for key in ("mean", "var"):
                new[key] = jnp.where(seen, acc[key], old[key]).astype(jnp.asarray(old[key]).dtype)
            if "count" in new:
                new["count"] = jnp.asarray(n_batches, jnp.asarray(old["count"]).dtype)
            stats = _set(stats, path, new)
        if missing:
            raise ValueError(
                f"these batch-norm layers were not recalibrated: {missing}. Only jbn.BatchNorm layers "
                "recalibrate (replace flax.linen.BatchNorm with jbn.BatchNorm), apply_fn must call each, "
                "and each needs at least one unmasked value"
            )
    return {**others, "batch_stats": stats}
