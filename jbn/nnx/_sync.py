"""Merging, in place, the running statistics that NNX replica models kept separately.

The merge itself is :mod:`jbn._sync`'s, on the pure-dict form of the models'
``nnx.BatchStat`` state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from .. import _checks as checks
from .._sync import (
    UNMAPPED,
    Path,
    check_replica_axis,
    layer_paths,
    merge_over_axis,
    merge_stacked,
    stack,
)


def _feature_ndim(module: Any) -> int | None:
    features = getattr(module, "num_features", None)
    if isinstance(features, int):
        return 1
    if isinstance(features, tuple):
        return len(features)
    return None


def _check_stacked_model(model: nnx.Module, tree: Any, paths: list[Path]) -> None:
    """A single model given without axis_name must carry a leading replica axis."""
    modules = {p: m for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    check_replica_axis(
        tree,
        paths,
        "models is one model",
        "a list of replica models or a model with stacked statistics (e.g. built under nnx.vmap)",
        lambda path: _feature_ndim(modules.get(path)),
    )


def sync_batch_stats(
    models: nnx.Module | Sequence[nnx.Module],
    counts: ArrayLike | Sequence[float] | None = None,
    *,
    axis_name: Any = None,
    unbiased: bool = False,
) -> None:
    """Merges, in place, the running statistics that NNX replica models kept separately.

    The NNX counterpart of :func:`jbn.sync_batch_stats` (same formula and options):
    afterwards every replica's batch norms hold the mean and variance of all the
    replicas' data together. Works on the ``nnx.BatchStat`` ``mean`` / ``var`` (and
    ``count``) of ``jbn.nnx.BatchNorm`` and ``flax.nnx.BatchNorm`` alike; a model
    with any other ``nnx.BatchStat`` is an error. Three ways to call it:

    * a list of replica models (the same architecture), e.g. copies trained on
      different shards: each gets the merged statistics;
    * one model whose statistics have a leading replica axis, as an ensemble
      built with ``nnx.split_rngs`` and ``nnx.vmap`` has: every replica's slice
      gets the merged statistics (the shape stays);
    * inside ``nnx.vmap``, ``nnx.pmap`` or ``shard_map`` with ``axis_name``: the
      device's own model and count.

    Args:
      models: the replica models, as above.
      counts: how many values each replica's statistics summarize (None: equal),
        as :func:`jbn.sync_batch_stats` takes them, with ``axis_name`` and ``unbiased``.
      axis_name: the named mapped axis whose devices hold the replicas, or None.
      unbiased: the variances are Bessel-corrected (``unbiased_running_var=True``).
    """
    fn = "jbn.nnx.sync_batch_stats"
    if isinstance(models, nnx.Module):
        replicas = [models]
    elif isinstance(models, Sequence) and all(isinstance(m, nnx.Module) for m in models):
        replicas = list(models)
        if not replicas:
            raise ValueError("models is an empty list: give at least one replica model")
    else:
        raise TypeError(
            f"models must be an nnx.Module or a list of them, got {type(models).__name__}"
        )
    states = [nnx.state(m, nnx.BatchStat) for m in replicas]
    trees = [nnx.to_pure_dict(s) for s in states]
    for i, tree in enumerate(trees):
        what = "models" if isinstance(models, nnx.Module) else f"models[{i}]"
        if not layer_paths(tree, f"{what}' batch stats"):
            raise ValueError(f"{what} holds no batch norm (nnx.BatchStat 'mean' and 'var')")
    if axis_name is not None:
        if len(replicas) > 1 or not isinstance(models, nnx.Module):
            raise ValueError("with axis_name, models is this device's own model, not a list")
        checks.axis_size(axis_name, fn, UNMAPPED)
        merged = merge_over_axis(trees[0], counts, axis_name, unbiased, "models' batch stats")
        new = [merged]
    elif isinstance(models, nnx.Module):
        _check_stacked_model(models, trees[0], layer_paths(trees[0], "models' batch stats"))
        merged = merge_stacked(trees[0], counts, unbiased, "models' batch stats")
        stacked = jax.tree.map(lambda m, old: jnp.broadcast_to(m, jnp.shape(old)), merged, trees[0])
        new = [stacked]
    else:
        merged = merge_stacked(stack(trees, "models' batch stats"), counts, unbiased, "models")
        new = [merged] * len(replicas)
    for model, state, tree in zip(replicas, states, new, strict=True):
        nnx.replace_by_pure_dict(state, tree)
        nnx.update(model, state)
