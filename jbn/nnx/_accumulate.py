"""Gradient accumulation for NNX models: :func:`use_accumulation` and :func:`commit_batch_stats`.

:func:`use_accumulation` puts every batch norm of a model into the accumulation
mode of :func:`jbn.bn_forward` for its training calls, in place: the
accumulator lives in ``nnx.BatchStat`` variables of each layer
(``accum_count``, ``accum_mean``, ``accum_m2``), so ``nnx.jit``, ``nnx.scan``
and ``nnx.split`` carry it like the running statistics.
:func:`commit_batch_stats` applies each layer's one running update with its
own options (:func:`jbn.bn_commit`).
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx import graph

from .. import _options as options
from .._accumulate import ACCUMULATOR, Accumulate, bn_commit, empty_accumulator
from ._batch_norm import BatchNorm, _store
from ._convert import _check_to_jbn, _to_jbn
from ._graph import replace_modules
from ._stream import _batch_norms


def use_accumulation(model: Any, on: bool = True) -> Any:
    """Puts, in place, every batch norm of an NNX model into gradient accumulation (or out).

    Each ``jbn.nnx.BatchNorm`` called in training mode then normalizes the
    micro-batch with its own statistics, with the training backward, leaves
    its running statistics alone and adds the micro-batch's exact statistics
    to its accumulator (:class:`jbn.Accumulate`); evaluation calls run as
    usual. :func:`commit_batch_stats` applies one running update per layer.
    ``on=True`` starts empty accumulators; ``on=False`` removes them and takes
    the layers out of the mode. A ``flax.nnx.BatchNorm`` is first converted
    to ``jbn.nnx.BatchNorm`` (as by :func:`jbn.nnx.convert`)::

      >>> import jax, jax.numpy as jnp, jbn
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model = jbn.nnx.use_accumulation(model)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> for micro in jnp.split(x, 4):
      ...     y = model(micro)
      >>> jbn.nnx.commit_batch_stats(model)   # one running update for all 8 examples

    Args:
      model: an NNX module (or a list, dict or tuple of them), or a part of one.
      on: True: into the mode, with empty accumulators; False: out of it.

    Returns:
      ``model``, changed in place (the new layer if ``model`` is itself a flax batch norm).
    """
    if not isinstance(on, bool):
        raise TypeError(f"on must be a Python bool, got {on!r}")
    if on:
        for node in [n for _, n in [((), model), *graph.iter_graph(model)]]:
            if isinstance(node, nnx.BatchNorm):
                _check_to_jbn(node)
        model = replace_modules(model, lambda m: isinstance(m, nnx.BatchNorm), _to_jbn)
    for node in _batch_norms(model, "jbn.nnx.use_accumulation"):
        if on:
            _check_layer(node)
            for k, v in empty_accumulator(node.mean.shape, node.mean[...].dtype).items():
                setattr(node, k, nnx.BatchStat(v))
        elif getattr(node, "accumulation", None) is not None:
            for k in ACCUMULATOR:
                delattr(node, k)
        node.accumulation = Accumulate() if on else None
    return model


def _check_layer(node: BatchNorm) -> None:
    layer = options.jbn_kwargs(node)
    if layer["virtual_batch_size"] is not None or layer["renorm"]:
        raise ValueError(
            f"jbn.nnx.use_accumulation: a batch norm has virtual_batch_size="
            f"{layer['virtual_batch_size']!r}, renorm={layer['renorm']!r}; accumulation normalizes each "
            "micro-batch with its own statistics (the micro-batch is the ghost batch): use neither"
        )


def commit_batch_stats(model: Any) -> None:
    """Commits, in place, every batch norm's accumulated micro-batches: one running update each.

    Each layer in the accumulation mode (:func:`use_accumulation`) updates its
    running statistics as one training step on the concatenation of its
    accumulated micro-batches would, with its own ``momentum``,
    ``unbiased_running_var`` and ``finite_running_stats``
    (:func:`jbn.bn_commit`), and empties its accumulator; a layer with nothing
    accumulated is left unchanged. Works under ``nnx.jit``.

    Raises:
      ValueError: when no batch norm of ``model`` is in the accumulation mode.
    """
    layers = [
        n
        for n in _batch_norms(model, "jbn.nnx.commit_batch_stats")
        if getattr(n, "accumulation", None) is not None
    ]
    if not layers:
        raise ValueError(
            "jbn.nnx.commit_batch_stats: no batch norm of the model is in the accumulation "
            "mode: call jbn.nnx.use_accumulation(model) before the micro-batches"
        )
    for node in layers:
        state = {**node.running_stats(), **{k: getattr(node, k)[...] for k in ACCUMULATOR}}
        layer = options.jbn_kwargs(node)
        new = bn_commit(
            state,
            momentum=node.momentum,
            unbiased_running_var=layer["unbiased_running_var"],
            finite_running_stats=layer["finite_running_stats"],
        )
        _store(node, new)
