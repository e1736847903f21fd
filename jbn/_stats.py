"""Batch statistics: exact per-feature means, variances and counts, and how they combine.

Everything jbn knows about statistics is written here once: the shifted sums of
the fast path, the plain two-pass reference, counts and their synchronization
over a named axis (psums of sums about a shift common to every device, see
:func:`synced_stats`), Bessel's correction, the count-weighted pooling of several
groups' statistics, and the exact combination of two sets of statistics (Chan,
Golub & LeVeque 1979):

    n = n_a + n_b,   δ = μ_b - μ_a,   μ = μ_a + δ n_b / n,
    M2 = M2_a + M2_b + δ² n_a n_b / n,   var = M2 / n.

All statistics are computed in float32 (float64 for float64 input) and have the
broadcast feature shape of ``x`` (size 1 on every reduced axis).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from ._xla_cpu import unshared

Array = jax.Array
_Values = TypeVar("_Values")


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """Hashable static settings of a statistics computation."""

    reduce_axes: tuple[int, ...]
    axis_name: Any = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None


def compute_dtype(dtype: Any) -> Any:
    """The dtype statistics and arithmetic use: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def broadcast_shape(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with every reduced axis of size 1: the shape of per-feature statistics."""
    return tuple(1 if a in reduce_axes else s for a, s in enumerate(shape))


def psum(values: _Values, cfg: StatsConfig) -> _Values:
    """Sums over the devices of ``cfg.axis_name`` (identity without one)."""
    if cfg.axis_name is None:
        return values
    try:
        return lax.psum(values, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
    except NotImplementedError as error:
        if cfg.axis_index_groups is None:
            raise
        raise NotImplementedError(
            f"axis_index_groups={cfg.axis_index_groups} is not supported here: JAX implements "
            "grouped collectives under pmap only (not shard_map or vmap). Under shard_map, use a "
            "mesh axis per group instead, e.g. Mesh(devices.reshape(groups, -1), "
            "('group', 'data')) with axis_name='data'"
        ) from error


def real_dtype(dtype: Any) -> Any:
    """The real dtype of the same precision (float32 for complex64)."""
    return jnp.finfo(dtype).dtype


def abs_sq(d: Array) -> Array:
    """|d|²: d² for real d, re² + im² for complex d (a real array)."""
    if jnp.iscomplexobj(d):
        return d.real * d.real + d.imag * d.imag
    return d * d


def local_count(x: Array, mask: Array | None, cfg: StatsConfig, dtype: DTypeLike) -> Array:
    """Per-feature number of entries that enter the statistics on this device."""
    if mask is None:
        local = math.prod(x.shape[a] for a in cfg.reduce_axes)
        return jnp.full(broadcast_shape(x.shape, cfg.reduce_axes), local, dtype)
    return jnp.sum(mask, axis=cfg.reduce_axes, keepdims=True, dtype=dtype)


def varying_axes(x: Array) -> frozenset[Any]:
    """The manual mesh axes along which x varies (shard_map's type system; empty elsewhere)."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):  # jax <= 0.9
        return frozenset(aval.vma)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()))


def gather(values: Any, cfg: StatsConfig) -> Any:
    """``values`` (an array or a pytree of them) of every device of ``cfg.axis_name``,
    each leaf stacked on a new axis 0: one all-gather per leaf, exact.

    The one gather of jbn. Every device receives the same arrays in the same
    order, and under shard_map the result is typed invariant (replicated), as a
    psum's would be, so a function can return it with ``out_specs=P()``.
    """
    names = cfg.axis_name if isinstance(cfg.axis_name, tuple) else (cfg.axis_name,)

    def one(leaf: Any) -> Array:
        leaf = jnp.asarray(leaf)
        if not set(names) <= varying_axes(leaf):
            # Typed the same on every device (shard_map) or untyped (pmap, vmap): the
            # select on the device index types it varying, so that the gather can type
            # its result invariant; the values are unchanged.
            leaf = jnp.where(lax.axis_index(cfg.axis_name) >= 0, leaf, leaf)
        to = "invarying" if set(names) <= varying_axes(leaf) else "varying"
        try:
            return lax.all_gather(
                leaf, cfg.axis_name, axis_index_groups=cfg.axis_index_groups, to=to
            )
        except NotImplementedError:
            psum(leaf, cfg)  # raises the clear error for axis_index_groups outside pmap
            raise
        except AssertionError:
            if len(names) < 2:
                raise
        # jax 0.10's vmap cannot all_gather over several names at once: one name at a
        # time (vmap has no real collectives), major name first, as the tuple orders them.
        for name in reversed(names):
            leaf = lax.all_gather(leaf, name)
        return leaf.reshape((-1,) + leaf.shape[len(names) :])

    return jax.tree.map(one, values)


def _sums_about(
    x: Array, mask: Array | None, shift: Array, cfg: StatsConfig
) -> tuple[Array, Array]:
    """Per-feature ``(Σ(x - shift), Σ(x - shift)²)`` over the counted entries of ``x``.

    Each sum reads x through its own barrier: one pass each, no temporaries.
    """
    cd = compute_dtype(x.dtype)
    ra = cfg.reduce_axes
    s1 = jnp.sum(unshared(x).astype(cd) - unshared(shift), axis=ra, keepdims=True, where=mask)
    d = unshared(x, x)[0].astype(cd) - unshared(shift, shift)[0]
    s2 = jnp.sum(d * d, axis=ra, keepdims=True, where=mask)
    return s1, s2


def _local_stats(
    x: Array, mask: Array | None, cfg: StatsConfig
) -> tuple[Array, Array, Array, Array]:
    """This device's exact ``(count, shift, mean - shift, M2)``, each of the feature shape.

    Without a mask, shifted sums, which need no mean first: for a shift k near
    the mean, Σ(x-k)² - (Σ(x-k))²/n loses no precision (plain Σx² - (Σx)²/n
    does when |mean| >> std); k is the mean of the first slice along the first
    reduced axis (e.g. the first example; x itself when no axis is reduced).
    With a mask, where that slice may be all padding, k is the masked mean (a
    first pass), and the same shifted sums follow. A device without values
    returns zeros.
    """
    cd = compute_dtype(x.dtype)
    ra = cfg.reduce_axes
    n = local_count(x, mask, cfg, cd)
    if any(x.shape[a] == 0 for a in ra):  # an empty local batch: other devices hold the data
        zeros = jnp.zeros_like(n)
        return n, zeros, zeros, zeros
    if mask is None:
        first = (lax.index_in_dim(x, 0, ra[0], keepdims=True) if ra else x).astype(cd)
        shift = jnp.mean(first, axis=ra, keepdims=True)
    else:
        shift = jnp.sum(x.astype(cd), axis=ra, keepdims=True, where=mask) / jnp.maximum(n, 1)
    shift = lax.stop_gradient(shift)
    s1, s2 = _sums_about(x, mask, shift, cfg)
    dmean = s1 / jnp.maximum(n, 1)
    return n, shift, dmean, jnp.maximum(s2 - s1 * dmean, 0.0)


# The one-round statistics are exact to a few ulps while the batch mean lies within
# 4 batch standard deviations of the common shift (see synced_stats).
_ONE_ROUND_RATIO = 16.0


def common_shift(x: Array, center: Array | None, shape: tuple[int, ...], cfg: StatsConfig) -> Array:
    """A per-feature shift of ``shape`` that is the same on every device of ``cfg.axis_name``.

    ``center`` (e.g. the running mean) where JAX's types prove it the same on
    every device: under shard_map, ``x`` varies along the named axes and
    ``center`` does not. Elsewhere (pmap, vmap, ``check_vma=False``, a center
    that varies, none given) zero, which is the same everywhere by
    construction. Non-finite entries of ``center`` become zero too. The shift
    only decides how often the second round of :func:`synced_stats` runs, never
    the result.
    """
    names = cfg.axis_name if isinstance(cfg.axis_name, tuple) else (cfg.axis_name,)
    cd = compute_dtype(x.dtype)
    zero = jnp.zeros(shape, cd)  # typed the same on every device
    if center is None or jnp.iscomplexobj(center):
        return zero
    if not set(names) <= varying_axes(x) or set(names) & varying_axes(center):
        return zero
    center = lax.stop_gradient(jnp.broadcast_to(jnp.asarray(center, cd), shape))
    return jnp.where(jnp.isfinite(center), center, zero)


def _group_size(cfg: StatsConfig) -> int:
    """The number of devices whose statistics one psum over ``cfg`` combines."""
    if cfg.axis_index_groups is not None:
        return len(cfg.axis_index_groups[0])
    return int(lax.axis_size(cfg.axis_name))


def synced_stats(
    x: Array, mask: Array | None, cfg: StatsConfig, center: Array | None = None
) -> tuple[Array, Array, Array, Array]:
    """Exact statistics over every device of ``cfg.axis_name`` from psums of shifted sums.

    About a shift c identical on every device (:func:`common_shift`), each
    device's sums add up in one psum:

        S1 = Σ (x - c),   S2 = Σ (x - c)²,   μ = c + S1/n,   var = S2/n - (S1/n)²,

    with the counts in the same psum when there is a mask (without one they are
    known statically). The last subtraction loses precision as (μ - c)²/σ²
    grows; that ratio is known after the psum, identically on every device, so
    where it exceeds 16 for any feature (a cold start, a sudden change of the
    data) a second round repeats the sums about c' = μ from the first, which is
    within a few ulps of |μ| of the mean: exact again. It is a ``lax.cond`` on
    the replicated predicate, so the second psum (and its two passes over x)
    runs only then.

    Returns ``(count, shift, mean - shift, var)``, the same bits on every device.
    """
    cd = compute_dtype(x.dtype)
    n = local_count(x, mask, cfg, cd)
    shape = broadcast_shape(x.shape, cfg.reduce_axes)
    n = jnp.broadcast_to(n, shape)
    c = common_shift(x, center, shape, cfg)
    # Without a mask every device holds the same static count: no need to send it.
    static_count = n * _group_size(cfg) if mask is None else None

    def reduce(about: Array, count: Array | None) -> tuple[Array, Array, Array]:
        s1, s2 = _sums_about(x, mask, about, cfg)
        if count is None:
            total, s1, s2 = psum(jnp.stack([n, s1, s2]), cfg)
        else:
            total = count
            s1, s2 = psum(jnp.stack([s1, s2]), cfg)
        n_safe = jnp.maximum(total, 1)
        d = s1 / n_safe
        return total, d, s2 / n_safe - d * d

    count, d, var = reduce(c, static_count)
    # (μ - c)² > 16 σ² for some feature: computed from psum results, so replicated. A
    # distance of a few ulps of c counts as none (a constant feature whose running mean
    # rounds next to its value): its share of the variance's error is ~ulp³.
    ulps = jnp.finfo(cd).eps * c
    far = jnp.any(d * d > _ONE_ROUND_RATIO * (var + ulps * ulps))

    def again(operands: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        c, d, _ = operands
        c = lax.stop_gradient(c + d)
        _, d, var = reduce(c, count)  # the counts are known by now
        return c, d, var

    c, d, var = lax.cond(far, again, lambda operands: operands, (c, d, var))
    return count, c, d, jnp.maximum(var, 0.0)


def shifted_stats(
    x: Array, mask: Array | None, cfg: StatsConfig, center: Array | None = None
) -> tuple[Array, Array, Array, Array]:
    """Exact per-feature statistics as ``(shift, mean - shift, biased variance, count)``.

    On one device, shifted sums about a value of the batch (see
    :func:`_local_stats`); with ``axis_name``, :func:`synced_stats`: psums of
    sums about a shift common to all devices (``center``, the running mean,
    where it is provably the same everywhere), with a second round only where
    that shift is far from the batch mean. The traffic does not grow with the
    number of devices, and every device gets the same exact result. The mean is returned
    in two parts so that x - mean can be formed as (x - shift) - (mean - shift):
    exact where x is close to the shift, while the mean itself rounds at
    |mean|'s scale. Carries no gradient through the shift (the result does not
    depend on it).
    """
    if cfg.axis_name is None:
        n, shift, dmean, m2 = _local_stats(x, mask, cfg)
        return shift, dmean, m2 / jnp.maximum(n, 1), n
    n, shift, dmean, var = synced_stats(x, mask, cfg, center)
    return shift, dmean, var, n


def reference_stats(x: Array, mask: Array | None, cfg: StatsConfig) -> tuple[Array, Array, Array]:
    """Plain two-pass ``(mean, biased variance, count)``, synchronized by summing sums and counts.

    For complex x the mean is complex and the variance E|x - μ|² real.
    """
    cd = compute_dtype(x.dtype)
    ra = cfg.reduce_axes
    x = x.astype(cd)
    where = True if mask is None else mask
    n = psum(local_count(x, mask, cfg, real_dtype(cd)), cfg)
    n_safe = jnp.maximum(n, 1)
    mean = psum(jnp.sum(x, axis=ra, keepdims=True, where=where), cfg) / n_safe
    var = psum(jnp.sum(abs_sq(x - mean), axis=ra, keepdims=True, where=where), cfg) / n_safe
    return mean, var, n


def batch_stats(
    x: Array, mask: Array | None, cfg: StatsConfig, center: Array | None = None
) -> tuple[Array, Array, Array]:
    """Exact per-feature ``(mean, biased variance, count)`` (see :func:`shifted_stats`)."""
    if jnp.iscomplexobj(x):
        return reference_stats(x, mask, cfg)
    shift, dmean, var, n = shifted_stats(x, mask, cfg, center)
    return shift + dmean, var, n


def unbiased(var: Array, n: Array) -> Array:
    """Bessel's correction: the biased variance of ``n`` values times n / (n - 1)."""
    return var * (n / jnp.maximum(n - 1, 1))


def pool_groups(mean: Array, var: Array, n: Array) -> tuple[Array, Array, Array]:
    """Count-weighted means over axis 0 of groups' statistics; the total count.

    The variance is the weighted mean of the groups' variances (what each
    group normalized with), not the variance of all their values together: for
    that, use :func:`combine`.
    """
    total = jnp.sum(n, axis=0, keepdims=True)
    weight = n / jnp.maximum(total, 1)
    return jnp.sum(weight * mean, axis=0), jnp.sum(weight * var, axis=0), total[0]


def combine(
    a: tuple[Array, Array, Array], b: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
    """Chan et al.'s exact combination of two ``(count, mean, M2)`` triples (M2 = var · count).

    A complex mean adds |δ|² (its variance is E|x - μ|²).
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    n_safe = jnp.maximum(n, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n_safe)
    m2 = m2_a + m2_b + abs_sq(delta) * (n_a * (n_b / n_safe))
    return n, mean, m2
