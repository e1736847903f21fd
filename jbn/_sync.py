"""Merging running statistics that replicas kept separately, exactly.

Replicas that normalize without ``axis_name`` (data-parallel training without
synchronized batch norm, an ensemble, several processes each on its own shard)
each keep their own running mean and variance. One set of statistics for all of
them is the statistics of all their values together: the count-weighted mean of
the means, and for the variance the count-weighted mean of the variances *plus*
the count-weighted variance of the means (the law of total variance). Averaging
the variances, as flax's ImageNet example does (``lax.pmean`` of the batch
stats), drops the second term. The replicas are combined pairwise with Chan et
al.'s formula (:func:`jbn._stats.combine`), so when each replica's statistics
are exact for its data, the merged ones are exact for the concatenated data.

:func:`sync_batch_stats` works on ``batch_stats`` trees of nested dicts (stacked
with a leading replica axis, a list of trees, or one tree per device inside a
mapped axis); :func:`jbn.nnx.sync_batch_stats` applies it to NNX models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import ArrayLike

from . import _checks as checks
from ._stats import StatsConfig, combine, compute_dtype, gather, unbiased
from ._tree import batch_norm_layers, lookup, replace, to_dicts

Array = jax.Array
Path = tuple[Any, ...]

# What to do instead of calling sync_batch_stats with an axis_name that is not bound.
UNMAPPED = "leave axis_name=None and give the stacked replicas"

# The counts a layer's running statistics may hold: batches seen ("count"), and per channel
# in a jbn.equinox.BatchNorm's state ("feature_count", its "count" being the steps).
_COUNT_KEYS = ("count", "feature_count")
# The entries a batch-norm layer's running statistics may hold.
_LAYER_KEYS = frozenset({"mean", "var", *_COUNT_KEYS})


def path_name(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def layer_paths(tree: Any, what: str) -> list[Path]:
    """Paths of the layers (dicts with 'mean' and 'var') of a batch_stats tree.

    Anything else in the tree is an error: it is not clear how to merge it.
    """

    def other(path: Path, node: Any) -> None:
        hint = (
            " (pass variables['batch_stats'], not the whole variables)"
            if path and path[0] == "params"
            else ""
        )
        raise ValueError(
            f"{what}: {path_name(path)!r} is a {type(node).__name__}, not part of a batch-norm "
            "layer (a dict with 'mean' and 'var'); only batch-norm running statistics can be "
            f"merged{hint}"
        )

    paths = batch_norm_layers(tree, other)
    for path in paths:
        extra = sorted(str(k) for k in lookup(tree, path) if k not in _LAYER_KEYS)
        if extra:
            raise ValueError(
                f"{what}: the batch-norm layer at {path_name(path)!r} holds {extra} besides "
                "'mean', 'var' and their counts; only batch-norm running statistics can be merged"
            )
    return paths


def _rebuild(tree: Any, merged: dict[Path, dict]) -> dict:
    """``tree`` as plain dicts, with each layer replaced by its merged statistics."""
    tree = to_dicts(tree)
    for path, layer in merged.items():
        tree = replace(tree, path, layer)
    return tree


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, Tracer)


def _counts(counts: Any, replicas: int | None, unbiased_var: bool) -> Array:
    """Per-replica counts as a float array: shape (replicas,), or () inside a mapped axis."""
    if counts is None:
        if unbiased_var:
            raise ValueError(
                "unbiased=True needs counts: Bessel's correction n/(n-1) of each replica's "
                "variance is undone and redone with its count"
            )
        return jnp.ones(() if replicas is None else (replicas,), jnp.float32)
    if _is_concrete(counts):
        values = np.asarray(counts)
        if not (
            np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
        ):
            raise TypeError(f"counts must be numbers, got dtype {values.dtype}")
        expected = () if replicas is None else (replicas,)
        if values.shape != expected:
            raise ValueError(
                f"counts must have shape {expected} (one count per replica"
                + (", this device's own inside the mapped axis" if replicas is None else "")
                + f"), got shape {values.shape}"
            )
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"counts must be finite and >= 0, got {values.tolist()}")
        if replicas is not None and not np.sum(values) > 0:
            raise ValueError(f"counts must not all be 0, got {values.tolist()}")
    counts = jnp.asarray(counts)
    expected = () if replicas is None else (replicas,)
    if counts.shape != expected:
        raise ValueError(f"counts must have shape {expected}, got shape {counts.shape}")
    return counts


def _reduce(n: Array, mean: Array, m2: Array) -> tuple[Array, Array, Array]:
    """Combines the (count, mean, M2) of axis 0 pairwise, in log2(replicas) vectorized steps."""
    while n.shape[0] > 1:
        half = n.shape[0] // 2
        a = (n[:half], mean[:half], m2[:half])
        b = (n[half : 2 * half], mean[half : 2 * half], m2[half : 2 * half])
        rest = tuple(v[2 * half :] for v in (n, mean, m2))
        n, mean, m2 = (jnp.concatenate([c, r]) for c, r in zip(combine(a, b), rest, strict=True))
    return n[0], mean[0], m2[0]


def _check_layer(layer: Mapping, replicas: int, path: Path) -> dict[str, Array]:
    """A layer's stacked statistics as arrays, checked: one leading axis of ``replicas``."""
    arrays = {k: jnp.asarray(v) for k, v in layer.items() if v is not None}
    mean, var = arrays["mean"], arrays["var"]
    if mean.shape != var.shape:
        raise ValueError(
            f"the layer at {path_name(path)!r} has mean of shape {mean.shape} but var of shape "
            f"{var.shape}: they must match"
        )
    for key, value in arrays.items():
        if value.shape[:1] != (replicas,):
            raise ValueError(
                f"the layer at {path_name(path)!r} has {key} of shape {value.shape}, expected a "
                f"leading replica axis of size {replicas} (the stacked replicas' statistics)"
            )
    return arrays


def _merge_layer(layer: Mapping[str, Array], n: Array, unbiased_var: bool) -> dict[str, Array]:
    """One layer's merged statistics from its stacked ones (leading replica axis)."""
    mean, var = layer["mean"], layer["var"]
    replicas = n.shape[0]
    cd = compute_dtype(jnp.promote_types(mean.dtype, var.dtype))
    counted = n > 0  # a replica without values contributes nothing, whatever it holds
    n = n.astype(cd).reshape((replicas,) + (1,) * (mean.ndim - 1))
    # Zeros, not just a zero weight: Chan's formula multiplies the mean by n_b / n,
    # and NaN * 0 or inf * 0 is NaN.
    m = jnp.where(n > 0, mean.astype(cd), 0)
    v = jnp.where(n > 0, var.astype(cd), 0)
    if unbiased_var:  # back to the biased variance M2/n of each replica
        v = v * (jnp.maximum(n - 1, 1) / jnp.maximum(n, 1))
    total, merged_mean, m2 = _reduce(n, m, v * n)
    merged_var = jnp.maximum(0.0, m2 / jnp.maximum(total, 1))
    if unbiased_var:
        merged_var = unbiased(merged_var, total)
    out = {"mean": merged_mean.astype(mean.dtype), "var": merged_var.astype(var.dtype)}
    for key in _COUNT_KEYS:
        if key in layer:
            # The merged statistics average all the counted replicas' batches.
            count = layer[key]
            where = counted.reshape((replicas,) + (1,) * (count.ndim - 1))
            out[key] = jnp.sum(jnp.where(where, count, 0), axis=0).astype(count.dtype)
    return out


@jax.jit(static_argnames="unbiased_var")
def _merge_layers(layers: list[dict[str, Array]], n: Array, unbiased_var: bool) -> list[dict]:
    # One compiled function for the whole tree, not a dispatch per operation and layer.
    return [_merge_layer(layer, n, unbiased_var) for layer in layers]


def _merge(tree: Any, paths: list[Path], n: Array, unbiased_var: bool) -> dict:
    """``tree`` with each stacked layer at ``paths`` replaced by the merged one."""
    layers = [_check_layer(lookup(tree, p), n.shape[0], p) for p in paths]
    merged = _merge_layers(layers, n, unbiased_var=unbiased_var)
    return _rebuild(tree, dict(zip(paths, merged, strict=True)))


def merge_stacked(tree: Any, counts: Any, unbiased_var: bool, what: str) -> dict:
    """The merged statistics of a stacked tree (its layers' replica axis checked by
    :func:`check_replica_axis`, or made by :func:`stack`)."""
    paths = layer_paths(tree, what)
    if not paths:
        raise ValueError(f"{what} holds no batch-norm layer (a dict with 'mean' and 'var')")
    replicas = {p: np.shape(lookup(tree, p)["mean"])[0] for p in paths}
    sizes = sorted(set(replicas.values()))
    if len(sizes) > 1:
        detail = ", ".join(f"{path_name(p)}: {r}" for p, r in replicas.items())
        raise ValueError(
            f"{what}: the layers' leading (replica) axes differ ({detail}); a stacked tree "
            "has one leading axis of the number of replicas on every leaf"
        )
    n = _counts(counts, sizes[0], unbiased_var)
    return _merge(tree, paths, n, unbiased_var)


def check_replica_axis(
    tree: Any,
    paths: list[Path],
    one: str,
    remedy: str,
    feature_ndim: Callable[[Path], int | None] = lambda path: None,
) -> None:
    """One tree given without ``axis_name`` must carry a leading replica axis on every layer.

    A layer's stacked statistics have the replica axis, then its feature axes:
    ``feature_ndim(path)`` of them where the caller knows (an NNX module's
    ``num_features``), else at least one. Without this check, an unstacked
    tree's features would be merged as if they were replicas.
    """
    for path in paths:
        shape = np.shape(lookup(tree, path)["mean"])
        ndim = feature_ndim(path)
        if len(shape) < 2 if ndim is None else len(shape) != ndim + 1:
            raise ValueError(
                f"{one} whose batch norm {path_name(path)!r} has statistics of shape {shape}, "
                f"i.e. no leading replica axis: give {remedy}, or axis_name inside a mapped axis"
            )


def stack(trees: Sequence[Any], what: str) -> Any:
    """A list of replicas' trees as one tree with a leading replica axis."""
    if not trees:
        raise ValueError(f"{what} is an empty list: give at least one replica's statistics")
    structures = [jax.tree.structure(t) for t in trees]
    for i, s in enumerate(structures[1:], 1):
        if s != structures[0]:
            raise ValueError(
                f"{what}: replica {i}'s tree differs from replica 0's; every replica must have "
                f"the same layers.\nreplica 0: {structures[0]}\nreplica {i}: {s}"
            )
    leaves = [jax.tree.leaves(t) for t in trees]
    for j, first in enumerate(leaves[0]):
        for i, other in enumerate(leaves[1:], 1):
            if np.shape(other[j]) != np.shape(first):
                raise ValueError(
                    f"{what}: replica {i} has a leaf of shape {np.shape(other[j])} where "
                    f"replica 0 has {np.shape(first)}; every replica's statistics must have "
                    "the same shapes"
                )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def merge_over_axis(tree: Any, counts: Any, axis_name: Any, unbiased_var: bool, what: str) -> dict:
    """Inside a mapped axis: gather every device's statistics, merge, same result everywhere."""
    paths = layer_paths(tree, what)
    if not paths:
        raise ValueError(f"{what} holds no batch-norm layer (a dict with 'mean' and 'var')")
    n = _counts(counts, None, unbiased_var)
    layers, n = gather(([dict(lookup(tree, p)) for p in paths], n), StatsConfig((), axis_name))
    return _merge(_rebuild(tree, dict(zip(paths, layers, strict=True))), paths, n, unbiased_var)


def sync_batch_stats(
    batch_stats: Any,
    counts: ArrayLike | Sequence[float] | None = None,
    *,
    axis_name: Any = None,
    unbiased: bool = False,
) -> dict[str, Any]:
    """Merges running statistics that replicas kept separately into the exact joint ones.

    Each batch-norm layer's running ``mean`` and ``var`` of the replicas become
    those of all their data together, each replica weighted by its count:

      mean = Σ nᵢ meanᵢ / Σ nᵢ,
      var  = Σ nᵢ varᵢ / Σ nᵢ + Σ nᵢ (meanᵢ - mean)² / Σ nᵢ,

    computed with Chan et al.'s pairwise combination. Where each replica's
    statistics are exact for its data (e.g. from :func:`jbn.recalibrate_batch_stats`),
    the result equals the statistics of the concatenated data. Averaging the
    variances alone (``lax.pmean`` of the batch stats, flax's ImageNet example)
    drops the second term, the spread of the replicas' means. Running averages
    (momentum) merge the same way; the result is then as good as the averages.

    Three ways to call it:

    * a stacked tree, every leaf with a leading replica axis (e.g. the
      ``batch_stats`` a ``jax.pmap``'d train step returns): returns one tree
      without that axis. A tree whose statistics have fewer than two axes has
      none (one replica's tree) and is an error;
    * a list of trees, one per replica: the same;
    * inside ``pmap``, ``shard_map`` or ``vmap`` with ``axis_name``: each device's
      own tree and count; every device gets the merged tree (one gather).

    Every layer (a dict with ``"mean"`` and ``"var"``, as ``jbn.BatchNorm`` and
    ``flax.linen.BatchNorm`` store them) keeps its dtypes; arithmetic is float32
    (float64 for float64 statistics). A cumulative layer's ``"count"`` (batches
    seen, ``momentum=None``) becomes the total over the replicas, as the merged
    statistics average all their batches; so does a ``"feature_count"`` (the steps
    each channel counted, in a ``jbn.equinox.BatchNorm``'s state). Anything else in
    the tree is an error.

    Args:
      batch_stats: the replicas' ``batch_stats`` collection(s), as above (not the
        whole variables).
      counts: how many values each replica's statistics summarize (e.g. its
        number of examples): shape ``(replicas,)``, or this device's scalar with
        ``axis_name``. None (default): all equal. A replica with count 0
        contributes nothing, whatever its statistics hold (NaN, inf), its
        ``"count"`` of batches included.
      axis_name: the named mapped axis whose devices hold the replicas, or None
        (default) for stacked statistics or a list.
      unbiased: the variances are Bessel-corrected, ``M2 / (n - 1)`` with n the
        replica's count (a layer with ``unbiased_running_var=True``). Each is
        turned back into ``M2 / n`` with its count, merged, and corrected again
        with the total count, so ``counts`` is required. Exact for statistics
        whose correction used that count (recalibrated ones); for running
        averages of per-batch corrected variances the n/(n - 1) factors differ by
        O(1/batch size).

    Returns:
      The merged ``batch_stats`` as nested dicts, with the replica axis removed
      (stacked or list input) or on every device (``axis_name``).
    """
    what = "batch_stats"
    if axis_name is not None:
        if isinstance(batch_stats, (list, tuple)):
            raise ValueError(
                "with axis_name, batch_stats is this device's own tree, not a list of replicas"
            )
        checks.axis_size(axis_name, "jbn.sync_batch_stats", UNMAPPED)
        return merge_over_axis(batch_stats, counts, axis_name, unbiased, what)
    if isinstance(batch_stats, (list, tuple)):
        for i, t in enumerate(batch_stats):
            layer_paths(t, f"batch_stats[{i}]")
        batch_stats = stack(list(batch_stats), what)
    else:
        check_replica_axis(
            batch_stats,
            layer_paths(batch_stats, what),
            "batch_stats is one tree",
            "the replicas' statistics stacked (a leading replica axis on every leaf, as a "
            "pmap'd step returns them) or a list of trees, one per replica",
        )
    return merge_stacked(batch_stats, counts, unbiased, what)
