"""Recalibrating the running statistics of a linen model's ``jbn.BatchNorm`` layers.

An interceptor (:func:`flax.linen.intercept_methods`) sees each ``jbn.BatchNorm``
call's input and adds its exact statistics to an accumulator stored next to the
layer's running statistics (:mod:`jbn._recalibrate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.module import InterceptorContext

from .. import _checks as checks
from .. import _tree as tree
from .._recalibrate import accumulate, new_accumulator, recalibrated, run_passes
from ._batch_norm import BatchNorm as LinenBatchNorm

# The accumulator's name inside a linen layer's batch_stats while recalibrating.
ACCUMULATOR = "recalibration"

NOT_MUTABLE = (
    "jbn.recalibrate_batch_stats needs the updated batch_stats back: apply_fn must pass "
    "mutable=['batch_stats'] and return (output, updates), e.g. "
    "apply_fn=lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])"
)


def _updated_stats(out: Any) -> dict:
    if not (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[1], Mapping)
        and "batch_stats" in out[1]
    ):
        raise TypeError(
            "apply_fn must return (output, updates) with updates['batch_stats'], as "
            f"model.apply(..., mutable=['batch_stats']) does; got {type(out).__name__}. "
            f"{NOT_MUTABLE}"
        )
    return tree.to_dicts(out[1]["batch_stats"])


def _linen_interceptor(layer_type: type) -> Callable[..., Any]:
    def interceptor(
        next_fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: InterceptorContext,
    ) -> Any:
        module = context.module
        if (
            isinstance(module, layer_type)
            and context.method_name == "__call__"
            and module.has_variable("batch_stats", ACCUMULATOR)
        ):
            if not module.is_mutable_collection("batch_stats"):
                raise ValueError(NOT_MUTABLE)
            acc = module.get_variable("batch_stats", ACCUMULATOR)
            mask = kwargs.get("mask")
            module.put_variable("batch_stats", ACCUMULATOR, accumulate(acc, args[0], module, mask))
        return next_fun(*args, **kwargs)

    return interceptor


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

    The running statistics stay as they were until a pass ends; a cumulative
    layer (``momentum=None``) gets ``count`` = the number of batches. As in
    training (``finite_running_stats``, on by default), a feature whose
    statistics in a batch are not finite (a NaN or inf) leaves that batch out,
    and one that never had a finite batch keeps its running statistics.
    ``apply_fn`` is traced under :func:`jax.jit` (once per batch shape).

    Args:
      apply_fn: ``(variables, batch) -> (output, updates)``, see above.
      variables: the model's variables with a ``"batch_stats"`` collection.
      batches: an iterable of whatever ``apply_fn`` takes as its second
        argument; with ``passes > 1`` it is iterated once per pass (a list, not a
        generator).
      passes: how many times to go over ``batches`` (default 1).

    Returns:
      ``variables`` with new ``"batch_stats"``; every other collection is the
      same object as before.
    """
    checks.passes(passes)
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
    stats = tree.to_dicts(variables["batch_stats"])
    layers = tree.batch_norm_layers(stats)
    if not layers:
        raise ValueError(
            "variables['batch_stats'] holds no batch-norm layer (a dict with 'mean' and 'var')"
        )
    interceptor = _linen_interceptor(LinenBatchNorm)

    @jax.jit
    def run(others: dict[str, Any], stats: dict[str, Any], batch: Any) -> dict[str, Any]:
        with nn.intercept_methods(interceptor):
            updated = _updated_stats(apply_fn({**others, "batch_stats": stats}, batch))
        # Only the accumulators move on; the running statistics stay the pass's own.
        for path in layers:
            acc = tree.lookup(updated, path + (ACCUMULATOR,))
            if acc is not None:
                stats = tree.replace(stats, path + (ACCUMULATOR,), acc)
        return stats

    holder = {"stats": stats, "current": stats}

    def begin() -> None:
        current = holder["stats"]
        for path in layers:
            layer = tree.lookup(current, path)
            accumulator = new_accumulator(jnp.asarray(layer["mean"]))
            current = tree.replace(current, path, {**layer, ACCUMULATOR: accumulator})
        holder["current"] = current

    def step(batch: Any) -> None:
        holder["current"] = run(others, holder["current"], batch)

    def finish(n_batches: int) -> list[str]:
        stats, missing = holder["stats"], []
        for path in layers:
            acc = tree.lookup(holder["current"], path + (ACCUMULATOR,))
            if not bool(jnp.any(acc["count"] > 0)):
                missing.append("/".join(path))
            else:
                stats = tree.replace(
                    stats, path, recalibrated(tree.lookup(stats, path), acc, n_batches)
                )
        holder["stats"] = stats
        return missing

    run_passes(
        batches,
        passes,
        begin,
        step,
        finish,
        "Only jbn.BatchNorm layers recalibrate (replace flax.linen.BatchNorm with "
        "jbn.BatchNorm), and apply_fn must call each",
    )
    return {**others, "batch_stats": holder["stats"]}
