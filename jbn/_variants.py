"""Ghost batch norm and batch renormalization: small wrappers around the training function.

Ghost batches (Hoffer et al. 2017): x of shape (N, ...) becomes (G, N/G, ...)
and the new leading axis is one more feature axis, so the training function
normalizes each group with its own statistics. γ and β are broadcast over the
groups; autodiff of the broadcast sums their cotangents over the groups.

Renormalization (Ioffe 2017): with r and d constants for differentiation,
γ((x - μ_B)/σ_B · r + d) + β is training-mode batch norm with scale γr and bias
γd + β, so the gradient is the same analytic one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._checks import axis_size
from ._stats import batch_stats, compute_dtype
from ._train import TrainConfig

Array = jax.Array


def split_ghost_batches(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    cfg: TrainConfig,
    virtual_batch_size: int,
) -> tuple[Array, Array, Array, Array | None, TrainConfig]:
    """``(x, scale, bias, mask, cfg)`` regrouped into ghost batches along a new axis 0."""
    groups, rest = divmod(x.shape[0], virtual_batch_size)
    if rest:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} does not divide the batch: x has shape "
            f"{x.shape}, {x.shape[0]} examples on axis 0"
        )
    x = x.reshape((groups, virtual_batch_size) + x.shape[1:])
    mask = None if mask is None else mask.reshape(x.shape)
    stats = dataclasses.replace(cfg.stats, reduce_axes=tuple(a + 1 for a in cfg.stats.reduce_axes))
    scale = jnp.broadcast_to(scale[None], (groups,) + scale.shape)
    bias = jnp.broadcast_to(bias[None], (groups,) + bias.shape)
    return x, scale, bias, mask, dataclasses.replace(cfg, stats=stats)


def split_named_ghost_batches(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    cfg: TrainConfig,
    virtual_batch_size: int,
) -> tuple[Array, Array, Array, Array, TrainConfig, Array]:
    """Ghost batches along the named axes: ``(x, scale, bias, mask, cfg, group)``.

    Under ``cfg.stats.axis_name`` (e.g. a vmap over examples, as ``jbn.equinox``
    runs), group g holds the indices ``g * virtual_batch_size ...`` along the
    named axes. Every device makes G copies of its x along a new axis 0, a
    feature axis; copy g counts (mask) only where this device is in group g, so
    each group is normalized with its own statistics, and the device keeps the
    slice ``group`` of the output.
    """
    name = cfg.stats.axis_name
    size = axis_size(name)
    groups, rest = divmod(size, virtual_batch_size)
    if rest:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} does not divide the batch: the named "
            f"axes {name!r} map {size} examples"
        )
    per_feature = math.prod(x.shape[a] for a in cfg.stats.reduce_axes)
    if virtual_batch_size * per_feature <= 1:
        raise ValueError(
            f"Expected more than 1 value per feature when training: ghost batches of "
            f"virtual_batch_size={virtual_batch_size} examples of shape {x.shape} have "
            f"{virtual_batch_size * per_feature}"
        )
    group = lax.axis_index(name) // virtual_batch_size
    mine = (jnp.arange(groups) == group).reshape((groups,) + (1,) * x.ndim)
    copies = jnp.broadcast_to(x[None], (groups, *x.shape))
    in_group = jnp.broadcast_to(mine, copies.shape)
    if mask is not None:
        in_group = in_group & mask[None]
    scale = jnp.broadcast_to(scale[None], (groups,) + scale.shape)
    bias = jnp.broadcast_to(bias[None], (groups,) + bias.shape)
    stats = dataclasses.replace(cfg.stats, reduce_axes=tuple(a + 1 for a in cfg.stats.reduce_axes))
    return copies, scale, bias, in_group, dataclasses.replace(cfg, stats=stats), group


def renorm_affine(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    running: Mapping[str, Array],
    cfg: TrainConfig,
    rmax: ArrayLike,
    dmax: ArrayLike,
) -> tuple[Array, Array]:
    """Renormalization's ``(γ r, β + γ d)`` from this batch and the running statistics.

    ``running`` holds the running mean and var before this step's update, in a
    shape that broadcasts against the batch statistics.
    """
    cd = compute_dtype(x.dtype)
    batch_mean, batch_var, _ = batch_stats(lax.stop_gradient(x), mask, cfg.stats, running["mean"])
    running_mean, running_var = (lax.stop_gradient(running[k]).astype(cd) for k in ("mean", "var"))
    sigma = jnp.sqrt(running_var + cfg.epsilon)
    rmax, dmax = jnp.asarray(rmax, cd), jnp.asarray(dmax, cd)
    r = jnp.clip(jnp.sqrt(batch_var + cfg.epsilon) / sigma, 1.0 / rmax, rmax)
    d = jnp.clip((batch_mean - running_mean) / sigma, -dmax, dmax)
    r, d = lax.stop_gradient(r), lax.stop_gradient(d)
    return scale * r, bias + scale * d
