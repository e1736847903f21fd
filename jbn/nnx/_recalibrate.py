"""Recalibrating, in place, the running statistics of an NNX model's ``jbn.nnx.BatchNorm`` layers.

Each layer in the model graph is wrapped for the duration by a module that adds
its input's exact statistics to an accumulator (:mod:`jbn._recalibrate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _checks as checks
from .._recalibrate import accumulate, new_accumulator, recalibrated, run_passes
from ._batch_norm import BatchNorm as NnxBatchNorm
from ._graph import module_paths, replace_modules


class _Collecting(nnx.Module):
    """Wraps a ``jbn.nnx.BatchNorm`` while recalibrating: same outputs, statistics collected."""

    def __init__(self, layer: NnxBatchNorm) -> None:
        self.layer = layer
        self.acc = nnx.BatchStat(new_accumulator(layer.mean[...]))

    def __call__(
        self,
        x: jax.typing.ArrayLike,
        *args: Any,
        mask: jax.typing.ArrayLike | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        x_in, _, running = self.layer.prepare(x)
        self.acc.set_value(accumulate(self.acc.get_value(), x_in, self.layer, mask))
        y = self.layer(x, *args, mask=mask, **kwargs)
        for k, v in running.items():  # the running statistics stay the pass's own
            getattr(self.layer, k)[...] = v
        return y


def recalibrate_batch_stats(
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
    ``count`` = the number of batches. A feature whose statistics in a batch
    are not finite leaves that batch out (``finite_running_stats``, as in
    training). If anything fails, the model's running
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
    wrapped: list[tuple[NnxBatchNorm, _Collecting]] = []  # (layer, its wrapper), in graph order

    def wrap(layer: NnxBatchNorm) -> _Collecting:
        wrapped.append((layer, _Collecting(layer)))
        return wrapped[-1][1]

    replace_modules(model, is_layer, wrap)
    layers = [layer for layer, _ in wrapped]
    saved = [layer.running_stats() for layer in layers]

    def begin() -> None:
        for layer, wrapper in wrapped:
            wrapper.acc.set_value(new_accumulator(layer.mean[...]))

    def finish(n_batches: int) -> list[str]:
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
        run_passes(
            batches,
            passes,
            begin,
            lambda batch: step(model, batch),
            finish,
            "forward must call each",
        )
    except BaseException:
        for layer, running in zip(layers, saved, strict=True):
            for k, v in running.items():
                getattr(layer, k)[...] = v
        raise
    finally:
        replace_modules(model, lambda m: isinstance(m, _Collecting), lambda w: w.layer)
