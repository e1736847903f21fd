"""Training-mode normalization: the analytic custom_vjp and its plain reference.

``bn_train`` calls a :func:`jax.custom_vjp` (``_bn_train``) whose backward is the closed-form
batch-norm gradient (Ioffe & Szegedy 2015, section 3):

    dx = (N dx̂ - Σ dx̂ - x̂ Σ(dx̂ x̂)) / (N √(σ² + ε)),   dγ = Σ dy x̂,   dβ = Σ dy,

with dx̂ = γ dy. It keeps only the input (or, with ``residual="output"``, only
the output) plus per-feature vectors for the backward pass.
``bn_train_reference`` is the same function in plain jnp for JAX to
differentiate; the tests compare the two, and ``autodiff=True`` selects it.

Both take ``scale`` and ``bias`` already in the broadcast feature shape and
``center`` (the running mean, or None), a per-feature value the synchronized
statistics may sum about (see :func:`jbn._stats.synced_stats`; it never changes
the result), and return ``(y, batch mean, batch variance, count)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import Residual
from ._stats import (
    StatsConfig,
    compute_dtype,
    psum,
    reference_stats,
    shifted_stats,
    varying_axes,
)
from ._xla_cpu import unshared

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hashable static settings of one training-mode call (the custom_vjp's nondiff arg)."""

    stats: StatsConfig
    epsilon: float
    residual: Residual
    min_scale: float
    x_dtype: Any  # numpy dtypes
    out_dtype: Any


def effective_scale(scale: Array, cfg: TrainConfig) -> Array:
    """The scale the forward pass uses: with residual="output", |γ| >= min_scale.

    Rebuilding x̂ = (y - β)/γ from the output needs γ away from 0. Entries with
    |γ| < min_scale use ±min_scale (sign kept, +min_scale for exactly 0); the
    gradient passes straight through to γ, so such a γ can still grow.
    """
    if cfg.residual != "output":
        return scale
    sign = jnp.where(scale < 0, -1.0, 1.0).astype(scale.dtype)
    clamped = jnp.where(jnp.abs(scale) < cfg.min_scale, sign * cfg.min_scale, scale)
    return scale + lax.stop_gradient(clamped - scale)


def inverse_std(var: Array, n: Array, epsilon: float) -> Array:
    """1/√(var + ε), and 0 for a feature with no counted value: its x̂ is 0, so y = β."""
    return jnp.where(n > 0, lax.rsqrt(var + epsilon), 0.0).astype(var.dtype)


def bn_train_reference(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    center: Array | None,
    cfg: TrainConfig,
) -> tuple[Array, Array, Array, Array]:
    """Training-mode batch norm in plain jnp, for JAX to differentiate. Same outputs as bn_train.

    Complex x works here (complex mean, real variance E|x - μ|²). ``center`` is
    not used: the two-pass statistics need no shift.
    """
    del center
    cd = compute_dtype(x.dtype)
    mean, var, n = reference_stats(x, mask, cfg.stats)
    scale = effective_scale(scale, cfg).astype(var.dtype)
    xhat = (x.astype(cd) - mean) * inverse_std(var, n, cfg.epsilon)
    y = xhat * scale + bias.astype(var.dtype)
    return y.astype(cfg.out_dtype), mean, var, n


def bn_train(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    center: Array | None,
    cfg: TrainConfig,
) -> tuple[Array, Array, Array, Array]:
    """Training-mode batch norm: (y, batch mean, batch var, count); gradient via _bn_train_bwd."""
    if center is not None:
        center = lax.stop_gradient(center)
    return _bn_train(x, scale, bias, mask, center, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _bn_train(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    center: Array | None,
    cfg: TrainConfig,
) -> tuple[Array, Array, Array, Array]:
    return _bn_train_fwd(x, scale, bias, mask, center, cfg)[0]


# What the backward pass keeps: (x or y, mask, (shift, mean - shift) or None, rstd, scale,
# bias, count).
_Saved = tuple[Array, Array | None, tuple[Array, Array] | None, Array, Array, Array, Array]


def _bn_train_fwd(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    center: Array | None,
    cfg: TrainConfig,
) -> tuple[tuple[Array, Array, Array, Array], _Saved]:
    cd = compute_dtype(x.dtype)
    shift, dmean, var, n = shifted_stats(x, mask, cfg.stats, center)
    rstd = inverse_std(var, n, cfg.epsilon)
    scale_eff = effective_scale(scale, cfg)
    # y = γ rstd (x - μ) + β = (x - shift) a + (β - (μ - shift) a): x - shift first,
    # exact where x is near the shift, then one multiply-add with per-feature
    # vectors (x*a + b would cancel catastrophically when |mean| >> std).
    a = scale_eff.astype(cd) * rstd
    b = bias.astype(cd) - dmean * a
    # The vectors get their own barrier, or XLA:CPU recomputes them per element.
    shift_again, a, b = unshared(shift, a, b)
    y = ((x.astype(cd) - shift_again) * a + b).astype(cfg.out_dtype)
    if cfg.residual == "output":
        saved = (y, mask, None, rstd, scale_eff, bias, n)
    else:
        saved = (x, mask, (shift, dmean), rstd, scale, bias, n)
    return (y, shift + dmean, var, n), saved


def _param_cotangent(
    local: Array, synced: Array, param: Array, dy: Array, cfg: StatsConfig
) -> Array:
    """Sum a parameter's cotangent over devices where autodiff would.

    ``synced`` is ``local`` summed over every device of ``cfg.axis_name``, which
    the backward pass has computed anyway: where autodiff sums over all of
    them, it is reused, so no further collective is spent.

    Under shard_map with replicated (invariant) parameters and a batch that
    varies along axis_name, JAX's own autodiff psums the parameter cotangent;
    under pmap and vmap (parameters per device) it stays per device. Read that
    from the varying-manual-axes types so the custom rule matches autodiff in
    every case.
    """
    if cfg.axis_name is None:
        return local
    names = cfg.axis_name if isinstance(cfg.axis_name, tuple) else (cfg.axis_name,)
    dy_vma, param_vma = varying_axes(dy), varying_axes(param)
    to_sum = tuple(a for a in names if a in dy_vma and a not in param_vma)
    if not to_sum:
        return local
    if to_sum == names:
        return synced
    return lax.psum(local, to_sum, axis_index_groups=cfg.axis_index_groups)


def _bn_train_bwd(
    cfg: TrainConfig, saved: _Saved, cotangents: tuple[Array, Array, Array, Array]
) -> tuple[Array, Array, Array, None, None]:
    # The batch statistics are outputs only for the running-average update,
    # which carries no gradient: their cotangents are ignored.
    dy = cotangents[0]
    y_or_x, mask, shifted_mean, rstd, scale, bias, n = saved
    cd = rstd.dtype
    ra = cfg.stats.reduce_axes
    dy32 = dy.astype(cd)
    scale32 = scale.astype(cd)
    # x - μ = ((v - shift) - offset) / divisor, v the saved array: from the input,
    # (x - shift) - (μ - shift); from the output, (y - β) / (γ rstd), exact because
    # |γ| >= min_scale (see effective_scale). Only v - shift is formed per element;
    # offset and divisor are per feature, applied to the sums and coefficients.
    if cfg.residual == "output":
        # rstd is 0 for a feature without counted values (x̂ = 0): divide by 1 there.
        divisor = jnp.where(rstd > 0, scale32 * rstd, 1)
        shift, offset = bias.astype(cd), jnp.zeros_like(rstd)
    else:
        assert shifted_mean is not None  # always saved with residual="input"
        (shift, offset), divisor = shifted_mean, jnp.ones_like(rstd)
    # Every output, padded or not, is γ x̂ + β with the shared statistics, so the
    # sums run over all entries; only the statistics' own dependence on x (the
    # correction terms of dx) is restricted to the unmasked entries. Each sum
    # reads its inputs through its own barrier (see _xla_cpu).
    sum_dy = jnp.sum(unshared(dy).astype(cd), axis=ra, keepdims=True)
    v_again, dy_again = unshared(y_or_x, dy)
    shift_again = unshared(shift, offset, divisor)[0]  # a tuple no other barrier has
    dy_vs = dy_again.astype(cd) * (v_again.astype(cd) - shift_again)
    if mask is not None:
        # Padding, whatever its values (NaN, inf), never reaches a counted entry's gradient:
        # a padded output's contribution to dγ counts only where it is finite.
        dy_vs = jnp.where(mask | jnp.isfinite(dy_vs), dy_vs, 0)
    sum_dy_vs = jnp.sum(dy_vs, ra, keepdims=True)
    # Σ dy (x - μ): offset Σ dy is of the size of the other term (|offset| is a few std).
    sum_dy_xc = (sum_dy_vs - offset * sum_dy) / divisor
    dbias = sum_dy
    dscale = sum_dy_xc * rstd
    g_sum_dy, g_sum_dy_xc = psum((sum_dy, sum_dy_xc), cfg.stats)
    n_safe = jnp.maximum(n, 1)
    # dx = γ rstd (dy - Σdy/N - x̂ Σ(dy x̂)/N) = c1 dy + c3 (v - shift) + c2, with
    # per-feature coefficients (through a barrier: computed once), one elementwise pass.
    c1 = scale32 * rstd
    c3 = -c1 * rstd * rstd * g_sum_dy_xc / n_safe / divisor
    c2 = -c1 * g_sum_dy / n_safe - c3 * offset
    shift_last, c1, c2, c3 = unshared(shift, c1, c2, c3)
    correction = c3 * (y_or_x.astype(cd) - shift_last) + c2
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = c1 * dy32 + correction
    dscale = _param_cotangent(dscale, g_sum_dy_xc * rstd, scale, dy, cfg.stats)
    dbias = _param_cotangent(dbias, g_sum_dy, bias, dy, cfg.stats)
    dscale, dbias = dscale.astype(scale.dtype), dbias.astype(bias.dtype)
    return dx.astype(cfg.x_dtype), dscale, dbias, None, None


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)
