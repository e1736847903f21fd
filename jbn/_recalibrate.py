"""Recalibrating running statistics: exact population statistics over many batches.

The batch-norm modules know nothing about this: recalibration drives them from
outside. For linen, an interceptor (:func:`flax.linen.intercept_methods`) sees
each ``jbn.BatchNorm`` call's input and adds its exact statistics to an
accumulator stored next to the layer's running statistics; for NNX, each
``jbn.nnx.BatchNorm`` in the model graph is wrapped for the duration by a module
that does the same. Batches are combined with Chan et al.'s exact formula
(:func:`jbn._stats.combine`), so the result is the mean and variance of all the
batches' values together (each batch weighted by its count), not the average of
the batch variances. The loop over passes and batches is written once, in
:func:`_run_passes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax import lax

from . import _checks as checks
from . import _tree as tree
from ._batch_norm import bn_stats
from ._graph import module_paths, replace_modules
from ._linen import BatchNorm as LinenBatchNorm
from ._nnx import BatchNorm as NnxBatchNorm
from ._stats import combine, unbiased

# The accumulator's name inside a linen layer's batch_stats while recalibrating.
ACCUMULATOR = "recalibration"

NOT_MUTABLE = (
    "jbn.recalibrate_batch_stats needs the updated batch_stats back: apply_fn must pass "
    "mutable=['batch_stats'] and return (output, updates), e.g. "
    "apply_fn=lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])"
)


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
        new["count"] = jnp.asarray(n_batches, jnp.asarray(old["count"]).dtype)
    return new


def _run_passes(
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
    return flax.core.unfreeze(out[1]["batch_stats"])


def _linen_interceptor(layer_type: type):
    def interceptor(next_fun, args, kwargs, context):
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
    layer (``momentum=None``) gets ``count`` = the number of batches.
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
    stats = flax.core.unfreeze(variables["batch_stats"])
    layers = tree.batch_norm_layers(stats)
    if not layers:
        raise ValueError(
            "variables['batch_stats'] holds no batch-norm layer (a dict with 'mean' and 'var')"
        )
    interceptor = _linen_interceptor(LinenBatchNorm)

    @jax.jit
    def run(others, stats, batch):
        with nn.intercept_methods(interceptor):
            updated = _updated_stats(apply_fn({**others, "batch_stats": stats}, batch))
        # Only the accumulators move on; the running statistics stay the pass's own.
        for path in layers:
            acc = tree.lookup(updated, path + (ACCUMULATOR,))
            if acc is not None:
                stats = tree.replace(stats, path + (ACCUMULATOR,), acc)
        return stats

    holder = {"stats": stats, "current": stats}

    def begin():
        current = holder["stats"]
        for path in layers:
            layer = tree.lookup(current, path)
            accumulator = new_accumulator(jnp.asarray(layer["mean"]))
            current = tree.replace(current, path, {**layer, ACCUMULATOR: accumulator})
        holder["current"] = current

    def step(batch):
        holder["current"] = run(others, holder["current"], batch)

    def finish(n_batches):
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

    _run_passes(
        batches,
        passes,
        begin,
        step,
        finish,
        "Only jbn.BatchNorm layers recalibrate (replace flax.linen.BatchNorm with "
        "jbn.BatchNorm), apply_fn must call each, and each needs at least one unmasked value",
    )
    return {**others, "batch_stats": holder["stats"]}


class _Collecting(nnx.Module):
    """Wraps a ``jbn.nnx.BatchNorm`` while recalibrating: same outputs, statistics collected."""

    def __init__(self, layer: NnxBatchNorm):
        self.layer = layer
        self.acc = nnx.BatchStat(new_accumulator(layer.mean[...]))

    def __call__(self, x, *args, mask=None, **kwargs):
        x_in, _, running = self.layer.prepare(x)
        self.acc.set_value(accumulate(self.acc.get_value(), x_in, self.layer, mask))
        y = self.layer(x, *args, mask=mask, **kwargs)
        for k, v in running.items():  # the running statistics stay the pass's own
            getattr(self.layer, k)[...] = v
        return y


def recalibrate_nnx_batch_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    passes: int = 1,
) -> None:
    """Recomputes, in place, the running statistics of every ``jbn.nnx.BatchNorm`` in ``model``.

    The NNX counterpart of :func:`jbn.recalibrate_batch_stats`: each layer's
    ``mean`` and ``var`` become the exact statistics of all the values its input
    took over ``batches`` (each batch weighted by its count, variances combined
    with Chan et al.'s parallel formula). Parameters are untouched. The model's
    mode decides what the layers pass on while collecting: after
    ``model.train()`` each normalizes with its batch's statistics (one pass
    suffices); after ``model.eval()`` with the running statistics of the
    previous pass, so ``passes`` = the depth in batch-norm layers makes every
    layer exact for evaluation. A cumulative layer (``momentum=None``) gets
    ``count`` = the number of batches. If anything fails, the model's running
    statistics are left exactly as they were.

    Args:
      model: an NNX module containing ``jbn.nnx.BatchNorm`` layers.
      batches: an iterable of inputs for ``forward``; a list (re-iterable) when
        ``passes > 1``.
      forward: ``(model, batch) -> anything``, run under ``nnx.jit`` (default:
        ``model(batch)``).
      passes: how many times to go over ``batches`` (default 1).
    """
    checks.passes(passes)
    is_layer = lambda m: isinstance(m, NnxBatchNorm)  # noqa: E731
    if is_layer(model):
        raise ValueError(
            "model is a single jbn.nnx.BatchNorm: recalibrate the model that contains it"
        )
    names = module_paths(model, is_layer)
    if not names:
        raise ValueError(
            "model contains no jbn.nnx.BatchNorm layer (flax.nnx.BatchNorm layers do not "
            "recalibrate: convert them first)"
        )
    forward = (lambda m, b: m(b)) if forward is None else forward
    step = nnx.jit(lambda m, b: forward(m, b))
    wrapped = []  # (layer, its wrapper), in graph order

    def wrap(layer):
        wrapped.append((layer, _Collecting(layer)))
        return wrapped[-1][1]

    replace_modules(model, is_layer, wrap)
    layers = [layer for layer, _ in wrapped]
    saved = [layer.running_stats() for layer in layers]

    def begin():
        for layer, wrapper in wrapped:
            wrapper.acc.set_value(new_accumulator(layer.mean[...]))

    def finish(n_batches):
        accs = [wrapper.acc.get_value() for _, wrapper in wrapped]
        missing = [
            names[id(layer)]
            for layer, a in zip(layers, accs, strict=True)
            if not jnp.any(a["count"] > 0)
        ]
        if missing:
            return missing
        for layer, acc in zip(layers, accs, strict=True):
            old = layer.running_stats()
            for k, v in recalibrated(old, acc, n_batches).items():
                getattr(layer, k)[...] = v
        return []

    try:
        _run_passes(
            batches,
            passes,
            begin,
            lambda batch: step(model, batch),
            finish,
            "forward must call each, and each needs at least one unmasked value",
        )
    except BaseException:
        for layer, running in zip(layers, saved, strict=True):
            for k, v in running.items():
                getattr(layer, k)[...] = v
        raise
    finally:
        replace_modules(model, lambda m: isinstance(m, _Collecting), lambda w: w.layer)
