"""Functional batch normalization: statistics, normalization and its analytic gradient.

All of jbn's math lives here. The Flax modules only fetch variables, call
:func:`bn_forward` and store what it returns.

Training mode goes through ``_bn_train``, a :func:`jax.custom_vjp` whose backward
is the closed-form batch-norm gradient (Ioffe & Szegedy 2015, section 3):

    dx = (N dx̂ - Σ dx̂ - x̂ Σ(dx̂ x̂)) / (N √(σ² + ε)),   dγ = Σ dy x̂,   dβ = Σ dy,

with dx̂ = γ dy. It keeps only the input (or, with ``residual="output"``, only the
output) plus per-feature vectors for the backward pass. ``_bn_train_reference`` is
the plain two-pass version that JAX differentiates itself; the tests compare the
two, and ``autodiff=True`` selects it (for forward-mode differentiation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

Array = jax.Array
Params = Mapping[str, ArrayLike] | None
State = Mapping[str, ArrayLike]

_RESIDUALS = ("input", "output")
_PARAM_KEYS = ("scale", "bias")
_STATE_KEYS = ("mean", "var", "count")


# --------------------------------------------------------------------------- #
# Configuration and input checks (static: they cost nothing under jit).
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Config:
    """Hashable static settings of one training-mode call (a custom_vjp nondiff arg)."""

    reduce_axes: tuple[int, ...]
    axis_name: Any
    axis_index_groups: tuple[tuple[int, ...], ...] | None
    epsilon: float
    residual: str
    min_scale: float
    x_dtype: Any  # numpy dtypes
    out_dtype: Any


def _canonical_axes(axis: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    ndim = len(shape)
    axes = (axis,) if isinstance(axis, numbers.Integral) else axis
    try:
        axes = tuple(axes)
    except TypeError:
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}") from None
    if not axes:
        raise ValueError("axis must name at least one feature axis, got ()")
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for x of shape {shape} ({ndim} dimensions); "
                f"expected -{ndim} <= axis < {ndim}"
            )
    canonical = tuple(int(a) % ndim for a in axes)
    if len(set(canonical)) != len(canonical):
        raise ValueError(
            f"axis {axis!r} repeats an axis of x (shape {shape}); each axis may appear once"
        )
    if len(canonical) == ndim:
        raise ValueError(
            f"axis {axis!r} names every axis of x (shape {shape}): batch norm needs at least "
            "one axis to reduce over"
        )
    return tuple(sorted(canonical))


def _check_x(x: ArrayLike) -> Array:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number, list, tuple)):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"x must have a floating-point dtype, got {x.dtype} (shape {x.shape}); "
            "cast it first, e.g. x.astype(jnp.float32)"
        )
    return x


def _check_vector(value: ArrayLike, name: str, feature_shape, x_shape, axes) -> Array:
    value = jnp.asarray(value)
    if value.shape != feature_shape:
        raise ValueError(
            f"{name} has shape {value.shape}, but x of shape {x_shape} with feature axes "
            f"{axes} needs shape {feature_shape}"
        )
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _check_params(
    params: Params, feature_shape, x_shape, axes
) -> tuple[Array | None, Array | None]:
    if params is None:
        return None, None
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a dict with 'scale' and/or 'bias', or None; got {type(params).__name__}"
        )
    unknown = sorted(set(params) - set(_PARAM_KEYS))
    if unknown:
        raise ValueError(
            f"params has unknown keys {unknown}; expected 'scale' and/or 'bias' (flax's names)"
        )
    scale = params.get("scale")
    bias = params.get("bias")
    if scale is not None:
        scale = _check_vector(scale, "params['scale']", feature_shape, x_shape, axes)
    if bias is not None:
        bias = _check_vector(bias, "params['bias']", feature_shape, x_shape, axes)
    return scale, bias


def _check_state(state: State, feature_shape, x_shape, axes, need_count: bool) -> dict[str, Array]:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a dict with 'mean' and 'var' (from bn_init), got {type(state).__name__}"
        )
    unknown = sorted(set(state) - set(_STATE_KEYS))
    if unknown:
        raise ValueError(
            f"state has unknown keys {unknown}; expected 'mean', 'var' and optionally 'count'"
        )
    out = {}
    for key in ("mean", "var"):
        if key not in state:
            raise ValueError(f"state is missing '{key}'; create it with jbn.bn_init(feature_shape)")
        out[key] = _check_vector(state[key], f"state['{key}']", feature_shape, x_shape, axes)
    if "count" in state:
        count = jnp.asarray(state["count"])
        if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer):
            raise ValueError(
                f"state['count'] must be an integer scalar, got shape {count.shape} dtype {count.dtype}"
            )
        out["count"] = count
    elif need_count:
        raise ValueError(
            "momentum=None (cumulative moving average) needs state['count']; "
            "create the state with jbn.bn_init(feature_shape, cumulative=True)"
        )
    return out


def _check_mask(mask: ArrayLike | None, x_shape) -> Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        if not jnp.issubdtype(mask.dtype, jnp.integer):
            raise TypeError(f"mask must be boolean (True counts), got dtype {mask.dtype}")
        mask = mask != 0
    ok = mask.ndim <= len(x_shape) and all(
        m in (1, s) for m, s in zip(mask.shape[::-1], x_shape[::-1], strict=False)
    )
    if not ok:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to x of shape {x_shape}")
    return jnp.broadcast_to(mask, x_shape)


def _check_momentum(momentum: Any) -> None:
    if momentum is None or isinstance(momentum, jax.core.Tracer):
        return
    if isinstance(momentum, bool) or not isinstance(
        momentum, (numbers.Real, np.ndarray, jax.Array)
    ):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (new = momentum * old + (1 - momentum) * batch), got {momentum}"
        )


def _static_float(value: Any, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.generic)):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    value = float(value)
    if not (value > 0.0 if positive else value >= 0.0) or not math.isfinite(value):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}"
        )
    return value


def _axis_groups(axis_index_groups: Any, axis_name: Any):
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            "axis_index_groups needs axis_name: it groups the devices of that named axis"
        )
    try:
        return tuple(tuple(int(i) for i in group) for group in axis_index_groups)
    except TypeError:
        raise TypeError(
            f"axis_index_groups must be a sequence of sequences of ints, got {axis_index_groups!r}"
        ) from None


def _axis_size(axis_name: Any) -> int:
    if axis_name is None:
        return 1
    try:
        return int(lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call bn_forward inside pmap, shard_map "
            "or vmap with that axis_name, or leave axis_name=None"
        ) from None


def _compute_dtype(x_dtype) -> Any:
    return jnp.promote_types(x_dtype, jnp.float32)


# --------------------------------------------------------------------------- #
# Statistics.
# --------------------------------------------------------------------------- #


def _psum(values, cfg: _Config):
    if cfg.axis_name is None:
        return values
    return lax.psum(values, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)


def _count(x: Array, mask: Array | None, cfg: _Config, dtype) -> Array:
    """Per-feature number of entries that enter the statistics on this device."""
    bshape = _feature_broadcast_shape(x.shape, cfg.reduce_axes)
    if mask is None:
        local = math.prod(x.shape[a] for a in cfg.reduce_axes)
        return jnp.full(bshape, local, dtype)
    return jnp.sum(mask, axis=cfg.reduce_axes, keepdims=True, dtype=dtype)


def _feature_broadcast_shape(shape, reduce_axes) -> tuple[int, ...]:
    return tuple(1 if a in reduce_axes else s for a, s in enumerate(shape))


def _unshared(*arrays):
    """The arrays, through an optimization barrier on XLA:CPU (unchanged elsewhere).

    XLA:CPU fuses an elementwise producer into a reduction only when that
    reduction is its single user. Two sums over x - k, or over bfloat16 x
    converted to float32 (which y and dx convert too), make it write x - k or the
    float32 x to memory in full and read it back, and a per-feature vector can
    become a full-size broadcast the same way. A barrier, which moves no data,
    gives a sum its own copy of the name, so each sum reads x directly, once.
    Identical barriers are merged, so each sum passes a different tuple (e.g.
    ``(x,)`` and ``(x, x)``); the arrays of one call must vary along the same
    mapped axes. Other backends fuse sibling reductions themselves.
    """
    out = lax.platform_dependent(
        *arrays, cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a
    )
    return out[0] if len(arrays) == 1 else tuple(out)


def _batch_stats(x: Array, mask: Array | None, cfg: _Config) -> tuple[Array, Array, Array]:
    """Exact per-feature mean, biased variance and count (see _shifted_stats)."""
    shift, dmean, var, n = _shifted_stats(x, mask, cfg)
    return shift + dmean, var, n


def _shifted_stats(x: Array, mask: Array | None, cfg: _Config) -> tuple[Array, Array, Array, Array]:
    """Exact per-feature statistics as (shift, mean - shift, biased variance, count).

    Without a mask, shifted sums, which need no mean first: for a shift k near
    the mean, E[(x-k)²] - E[x-k]² loses no precision (plain E[x²] - E[x]² does when
    |mean| >> std). k is the mean of the first slice along the first reduced axis
    (e.g. the first example), averaged over the devices of axis_name, and is a
    constant for differentiation since the result does not depend on it. With a
    mask, the first slice may be all padding, so the plain two-pass computation is
    used (shift = mean, mean - shift = 0). The mean is returned in two parts so
    that x - mean can be formed as (x - shift) - (mean - shift): exact where x is
    close to the shift, while the mean itself rounds at |mean|'s scale. Returns
    arrays of the broadcast feature shape, in the compute dtype.
    """
    if mask is not None:
        mean, var, n = _reference_stats(x, mask, cfg)
        return mean, jnp.zeros_like(mean), var, n
    cd = _compute_dtype(x.dtype)
    ra = cfg.reduce_axes
    shift = jnp.mean(
        lax.index_in_dim(x, 0, ra[0], keepdims=True).astype(cd), axis=ra, keepdims=True
    )
    if cfg.axis_name is not None:
        total, devices = _psum((shift, 1.0 + 0.0 * shift), cfg)
        shift = total / devices
    shift = lax.stop_gradient(shift)
    # Each sum reads x through its own barrier (see _unshared): one pass each, no temporaries.
    s1 = jnp.sum(_unshared(x).astype(cd) - _unshared(shift), axis=ra, keepdims=True)
    d = _unshared(x, x)[0].astype(cd) - _unshared(shift, shift)[0]
    s2 = jnp.sum(d * d, axis=ra, keepdims=True)
    n = _count(x, mask, cfg, cd)
    s1, s2, n = _psum((s1, s2, n), cfg)
    dmean = s1 / n
    var = jnp.maximum(s2 / n - dmean * dmean, 0.0)
    return shift, dmean, var, n


def _reference_stats(x: Array, mask: Array | None, cfg: _Config) -> tuple[Array, Array, Array]:
    """Plain two-pass mean and variance, synchronized by summing sums and counts."""
    cd = _compute_dtype(x.dtype)
    ra = cfg.reduce_axes
    x = x.astype(cd)
    where = True if mask is None else mask
    n = _psum(_count(x, mask, cfg, cd), cfg)
    n_safe = jnp.maximum(n, 1)
    mean = _psum(jnp.sum(x, axis=ra, keepdims=True, where=where), cfg) / n_safe
    var = _psum(jnp.sum(jnp.square(x - mean), axis=ra, keepdims=True, where=where), cfg) / n_safe
    return mean, var, n


# --------------------------------------------------------------------------- #
# Training-mode normalization: the custom_vjp and its reference.
# --------------------------------------------------------------------------- #


def _effective_scale(scale: Array, cfg: _Config) -> Array:
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


def _affine(scale: Array | None, bias: Array | None, bshape, cd) -> tuple[Array, Array]:
    scale = jnp.ones(bshape, cd) if scale is None else scale.reshape(bshape)
    bias = jnp.zeros(bshape, cd) if bias is None else bias.reshape(bshape)
    return scale, bias


def _bn_train_reference(x, scale, bias, mask, cfg: _Config):
    """Training-mode batch norm in plain jnp, for JAX to differentiate. Same outputs as _bn_train."""
    cd = _compute_dtype(x.dtype)
    mean, var, n = _reference_stats(x, mask, cfg)
    scale = _effective_scale(scale, cfg).astype(cd)
    xhat = (x.astype(cd) - mean) / jnp.sqrt(var + cfg.epsilon)
    y = xhat * scale + bias.astype(cd)
    return y.astype(cfg.out_dtype), mean, var, n


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bn_train(x, scale, bias, mask, cfg: _Config):
    """Training-mode batch norm: (y, batch mean, batch var, count); gradient via _bn_train_bwd."""
    return _bn_train_fwd(x, scale, bias, mask, cfg)[0]


def _bn_train_fwd(x, scale, bias, mask, cfg: _Config):
    cd = _compute_dtype(x.dtype)
    shift, dmean, var, n = _shifted_stats(x, mask, cfg)
    rstd = lax.rsqrt(var + cfg.epsilon)
    scale_eff = _effective_scale(scale, cfg)
    # x - mean first, then the per-feature multiplier: x*a + b would cancel
    # catastrophically when |mean| >> std.
    # The shift gets its own barrier here too, or XLA:CPU broadcasts it to full size.
    centered = _centered(x, *_unshared(shift, dmean), None, cd)
    y = (centered * (scale_eff.astype(cd) * rstd) + bias.astype(cd)).astype(cfg.out_dtype)
    if cfg.residual == "output":
        saved = (y, mask, None, rstd, scale_eff, bias, n)
    else:
        saved = (x, mask, (shift, dmean), rstd, scale, bias, n)
    return (y, shift + dmean, var, n), saved


def _varying_axes(x: Array) -> frozenset:
    """The manual mesh axes along which x varies (shard_map's type system)."""
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):  # jax <= 0.9
        return frozenset(aval.vma)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()))


def _param_cotangent(local: Array, param: Array, dy: Array, cfg: _Config) -> Array:
    """Sum a parameter's cotangent over devices where autodiff would.

    Under shard_map with replicated (invariant) parameters and a batch that varies
    along axis_name, JAX's own autodiff psums the parameter cotangent; under pmap
    and vmap (parameters per device) it stays per device. Read that from the
    varying-manual-axes types so the custom rule matches autodiff in every case.
    """
    if cfg.axis_name is None:
        return local
    names = cfg.axis_name if isinstance(cfg.axis_name, tuple) else (cfg.axis_name,)
    dy_vma, param_vma = _varying_axes(dy), _varying_axes(param)
    to_sum = tuple(a for a in names if a in dy_vma and a not in param_vma)
    if not to_sum:
        return local
    return lax.psum(local, to_sum, axis_index_groups=cfg.axis_index_groups)


def _centered(saved: Array, shift: Array, offset: Array | None, divisor: Array | None, cd) -> Array:
    """x - μ from the input, (x - shift) - (μ - shift), or from the output, (y - β) / (γ rstd)."""
    centered = saved.astype(cd) - shift
    if offset is not None:
        centered = centered - offset
    return centered if divisor is None else centered / divisor


def _bn_train_bwd(cfg: _Config, saved, cotangents):
    # The batch statistics are outputs only for the running-average update, which
    # carries no gradient: their cotangents are ignored.
    dy = cotangents[0]
    y_or_x, mask, shifted_mean, rstd, scale, bias, n = saved
    cd = rstd.dtype
    ra = cfg.reduce_axes
    dy32 = dy.astype(cd)
    scale32 = scale.astype(cd)
    if cfg.residual == "output":
        # x - μ from the output: exact because |scale| >= min_scale (see _effective_scale).
        shift, offset, divisor = bias.astype(cd), None, scale32 * rstd
    else:
        (shift, offset), divisor = shifted_mean, None
    centered = _centered(y_or_x, shift, offset, divisor, cd)  # x̂ = centered * rstd
    # Every output, padded or not, is γ x̂ + β with the shared statistics, so the
    # sums run over all entries; only the statistics' own dependence on x (the
    # correction terms of dx) is restricted to the unmasked entries. Each sum
    # reads its inputs through its own barrier (see _unshared).
    sum_dy = jnp.sum(_unshared(dy).astype(cd), axis=ra, keepdims=True)
    v_again, dy_again = _unshared(y_or_x, dy)
    if offset is None:
        shift_again, offset_again = _unshared(shift), None
    else:  # a tuple no other barrier has, or XLA:CPU merges them
        offset_again, shift_again = _unshared(offset, shift)
    centered_again = _centered(
        v_again, shift_again, offset_again, None if divisor is None else _unshared(divisor), cd
    )
    sum_dy_xc = jnp.sum(dy_again.astype(cd) * centered_again, axis=ra, keepdims=True)
    dbias = sum_dy
    dscale = sum_dy_xc * rstd
    g_sum_dy, g_sum_dy_xc = _psum((sum_dy, sum_dy_xc), cfg)
    n_safe = jnp.maximum(n, 1)
    # dx = γ rstd (dy - Σdy/N - x̂ Σ(dy x̂)/N): per-feature coefficients, one elementwise pass.
    c1 = scale32 * rstd
    c2 = -c1 * g_sum_dy / n_safe
    c3 = -c1 * rstd * rstd * g_sum_dy_xc / n_safe
    correction = c3 * centered + c2
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = c1 * dy32 + correction
    dscale = _param_cotangent(dscale, scale, dy, cfg).astype(scale.dtype)
    dbias = _param_cotangent(dbias, bias, dy, cfg).astype(bias.dtype)
    return dx.astype(cfg.x_dtype), dscale, dbias, None


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)

# --------------------------------------------------------------------------- #
# Ghost batches and batch renormalization: _bn_train on regrouped inputs.
# --------------------------------------------------------------------------- #


def _check_virtual_batch_size(virtual_batch_size: Any, feature_axes, axis_name) -> int | None:
    if virtual_batch_size is None:
        return None
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral):
        raise TypeError(
            f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}"
        )
    if virtual_batch_size < 1:
        raise ValueError(
            f"virtual_batch_size must be a positive int or None, got {virtual_batch_size}"
        )
    if 0 in feature_axes:
        raise ValueError(
            "virtual_batch_size splits axis 0 (the batch) into ghost batches, but axis 0 is a "
            f"feature axis here (feature axes {feature_axes})"
        )
    if axis_name is not None:
        raise ValueError(
            "virtual_batch_size cannot be combined with axis_name: ghost batches are split "
            "from each device's own batch, so leave axis_name=None"
        )
    return int(virtual_batch_size)


def _check_renorm(renorm: Any, rmax: Any, dmax: Any) -> bool:
    if not isinstance(renorm, (bool, np.bool_)):
        raise TypeError(f"renorm must be a Python bool, got {renorm!r}")
    for value, name, low in ((rmax, "rmax", 1.0), (dmax, "dmax", 0.0)):
        if isinstance(value, bool) or not isinstance(
            value, (numbers.Real, np.ndarray, np.generic, jax.Array)
        ):
            raise TypeError(
                f"{name} must be a float (or a scalar array, e.g. from a schedule), got {value!r}"
            )
        if jnp.shape(value) != ():
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
        if not isinstance(value, jax.core.Tracer) and not float(value) >= low:
            raise ValueError(f"{name} must be >= {low} (inf for no clipping), got {float(value)}")
    return bool(renorm)


def _bn_train_ghost_renorm(
    x,
    scale,
    bias,
    mask,
    state,
    cfg: _Config,
    feature_axes,
    feature_shape,
    *,
    virtual_batch_size,
    renorm,
    rmax,
    dmax,
    momentum,
    unbiased,
    autodiff,
):
    """Training mode with ghost batches and/or batch renormalization, through _bn_train.

    Ghost batches (Hoffer et al. 2017): x of shape (N, ...) becomes (G, N/G, ...)
    and the new leading axis is one more feature axis, so _bn_train normalizes
    each group with its own statistics. γ and β are broadcast over the groups;
    autodiff of the broadcast sums their cotangents over the groups.

    Renormalization (Ioffe 2017): with r and d constants for differentiation,
    γ((x - μ_B)/σ_B · r + d) + β is training-mode batch norm with scale γr and
    bias γd + β, so the gradient is the same analytic one.
    """
    cd = _compute_dtype(x.dtype)
    bshape = _feature_broadcast_shape(x.shape, cfg.reduce_axes)
    values = math.prod(x.shape[a] for a in cfg.reduce_axes) * _axis_size(cfg.axis_name)
    if virtual_batch_size is not None:
        groups, rest = divmod(x.shape[0], virtual_batch_size)
        if rest:
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size} does not divide the batch: x has shape "
                f"{x.shape}, {x.shape[0]} examples on axis 0"
            )
        values //= groups
        x_shape = x.shape
        x = x.reshape((groups, virtual_batch_size) + x_shape[1:])
        mask = None if mask is None else mask.reshape(x.shape)
        cfg = dataclasses.replace(cfg, reduce_axes=tuple(a + 1 for a in cfg.reduce_axes))
        scale = jnp.broadcast_to(scale[None], (groups,) + bshape)
        bias = jnp.broadcast_to(bias[None], (groups,) + bshape)
    if values <= 1:
        raise ValueError(
            f"Expected more than 1 value per feature when training, got x of shape {x.shape} "
            f"with feature axes {feature_axes} and virtual_batch_size={virtual_batch_size}: "
            f"each feature has {values} value(s) per batch"
        )
    if renorm:
        batch_mean, batch_var, _ = _batch_stats(lax.stop_gradient(x), mask, cfg)
        running_mean, running_var = (
            lax.stop_gradient(state[k]).astype(cd).reshape((1,) * (x.ndim - len(bshape)) + bshape)
            for k in ("mean", "var")
        )
        sigma = jnp.sqrt(running_var + cfg.epsilon)
        rmax, dmax = jnp.asarray(rmax, cd), jnp.asarray(dmax, cd)
        r = jnp.clip(jnp.sqrt(batch_var + cfg.epsilon) / sigma, 1.0 / rmax, rmax)
        d = jnp.clip((batch_mean - running_mean) / sigma, -dmax, dmax)
        r, d = lax.stop_gradient(r), lax.stop_gradient(d)
        scale, bias = scale * r, bias + scale * d
    train_fn = _bn_train_reference if autodiff else _bn_train
    y, mean, var, n = train_fn(x, scale, bias, mask, cfg)
    if virtual_batch_size is not None:
        y = y.reshape(x_shape)
        # The running statistics follow the groups' own: count-weighted means over the groups.
        if unbiased:
            var = var * (n / jnp.maximum(n - 1, 1))
            unbiased = False
        total = jnp.sum(n, axis=0, keepdims=True)
        weight = n / jnp.maximum(total, 1)
        mean, var, n = jnp.sum(weight * mean, axis=0), jnp.sum(weight * var, axis=0), total
    return y, _update_running(state, mean, var, n, momentum, unbiased, feature_shape)


# --------------------------------------------------------------------------- #
# Public API.
# --------------------------------------------------------------------------- #


def bn_init(
    feature_shape: int | Sequence[int],
    *,
    dtype: DTypeLike = jnp.float32,
    cumulative: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Creates batch-norm parameters and running statistics.

    The names and shapes are those of ``flax.linen.BatchNorm``'s ``params`` and
    ``batch_stats`` collections, so variables move between the two.

    Args:
      feature_shape: the sizes of the feature axes of ``x``, in axis order; e.g.
        ``C`` for (N, C), NHWC or NCHW input, ``(H, W, C)`` for per-activation
        batch norm of NHWC input with ``axis=(1, 2, 3)``.
      dtype: dtype of the parameters and statistics (default float32).
      cumulative: also create ``state["count"]`` (int32 scalar), the number of
        batches seen, which ``bn_forward(..., momentum=None)`` needs.

    Returns:
      ``(params, state)``: ``params = {"scale": ones, "bias": zeros}`` and
      ``state = {"mean": zeros, "var": ones}`` (plus ``"count": 0``).
    """
    shape = (
        (feature_shape,) if isinstance(feature_shape, numbers.Integral) else tuple(feature_shape)
    )
    if not all(isinstance(s, numbers.Integral) and s > 0 for s in shape):
        raise ValueError(
            f"feature_shape must be a positive int or tuple of positive ints, got {feature_shape!r}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    params = {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}
    state = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}
    if cumulative:
        state["count"] = jnp.zeros((), jnp.int32)
    return params, state


def _make_config(
    x: Array,
    axis: Any,
    *,
    epsilon: Any,
    axis_name: Any,
    axis_index_groups: Any,
    residual: str,
    min_scale: Any,
    dtype: Any,
) -> tuple[_Config, tuple[int, ...]]:
    feature_axes = _canonical_axes(axis, x.shape)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    if residual not in _RESIDUALS:
        raise ValueError(f"residual must be one of {_RESIDUALS}, got {residual!r}")
    if dtype is None:
        out_dtype = x.dtype
    else:
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating-point dtype or None, got {dtype}")
        out_dtype = jnp.dtype(dtype)
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    cfg = _Config(
        reduce_axes=reduce_axes,
        axis_name=axis_name,
        axis_index_groups=_axis_groups(axis_index_groups, axis_name),
        epsilon=_static_float(epsilon, "epsilon", positive=True),
        residual=residual,
        min_scale=_static_float(min_scale, "min_scale", positive=True),
        x_dtype=jnp.dtype(x.dtype),
        out_dtype=jnp.dtype(out_dtype),
    )
    return cfg, feature_axes


def _check_train(train: Any) -> bool:
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(
            f"train must be a Python bool, got {type(train).__name__}; under jax.jit make it "
            "static, e.g. jax.jit(step, static_argnames='train')"
        )
    return bool(train)


def bn_stats(
    x: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[Array, Array, Array]:
    """Batch statistics of ``x``: exact per-feature mean, biased variance and count.

    The statistics :func:`bn_forward` normalizes with in training mode, computed in
    one pass with shifted sums (no ``E[x²] - E[x]²`` cancellation), in float32 (or
    float64 for float64 input). Useful to recalibrate or inspect a network.

    Args:
      x: input array, floating point.
      axis: the feature axis or axes; every other axis is reduced.
      mask: optional boolean array broadcastable to ``x``; only True entries count.
      axis_name: optional named axis (pmap, shard_map, vmap) to sum over.
      axis_index_groups: optional groups of devices of ``axis_name`` (pmap only).

    Returns:
      ``(mean, var, count)``, each of the feature shape; ``count`` is the number of
      entries per feature (over all devices of ``axis_name``). Carries no gradient.
    """
    x = _check_x(x)
    cfg, feature_axes = _make_config(
        x,
        axis,
        epsilon=1.0,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        residual="input",
        min_scale=1.0,
        dtype=None,
    )
    mask = _check_mask(mask, x.shape)
    _axis_size(cfg.axis_name)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    mean, var, n = _batch_stats(lax.stop_gradient(x), mask, cfg)
    return mean.reshape(feature_shape), var.reshape(feature_shape), n.reshape(feature_shape)


def bn_forward(
    params: Params,
    state: State,
    x: ArrayLike,
    train: bool,
    *,
    axis: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    unbiased_running_var: bool = False,
    residual: str = "input",
    min_scale: float = 1e-3,
    dtype: DTypeLike | None = None,
    autodiff: bool = False,
    virtual_batch_size: int | None = None,
    renorm: bool = False,
    rmax: float | ArrayLike = 3.0,
    dmax: float | ArrayLike = 5.0,
) -> tuple[Array, dict[str, Array]]:
    """Batch normalization: y = scale * (x - mean) / sqrt(var + epsilon) + bias.

    In training mode (``train=True``) the mean and biased variance are those of
    the batch, per feature, over every axis of ``x`` except ``axis`` (and over the
    devices of ``axis_name``); the running statistics are updated from them. In
    evaluation mode the running statistics are used and ``state`` is returned as
    is. Statistics and arithmetic are float32 (float64 for float64 input); the
    output has ``x``'s dtype unless ``dtype`` says otherwise.

    The training-mode gradient is the analytic batch-norm backward (a
    ``jax.custom_vjp``), which keeps only ``x`` (or, with ``residual="output"``,
    only ``y``) plus per-feature vectors. Reverse mode of any order works; forward
    mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) cannot pass a custom_vjp, so
    use ``autodiff=True`` there. The running statistics carry no gradient.

    Args:
      params: ``{"scale": γ, "bias": β}`` of the feature shape, either may be
        missing, or None for no affine part.
      state: ``{"mean", "var"}`` running statistics of the feature shape, plus
        ``"count"`` for ``momentum=None`` (see :func:`bn_init`).
      x: input, floating point, e.g. (N, C), (N, H, W, C), (N, C, H, W) or (N, T, C).
      train: Python bool: batch statistics (True) or running statistics (False).
      axis: feature axis or axes (default -1). ``axis=1`` for NCHW; ``axis=(1, 2, 3)``
        for one mean per pixel and channel of NHWC input.
      momentum: running-average decay as in flax, ``new = momentum * old + (1 -
        momentum) * batch`` (torch's ``momentum`` is ``1 -`` this). None: cumulative
        average, the exact mean of all batch statistics so far (torch's
        ``momentum=None``); needs ``state["count"]``. Like torch, this averages
        the batch variances, which is not the variance of all the data seen: for
        exact population statistics use ``jbn.recalibrate_batch_stats``.
      epsilon: added to the variance, > 0.
      mask: boolean array broadcastable to ``x``; False entries (padding) are left
        out of the statistics, the running update, the gradient and the sync.
      axis_name: named mapped axis (pmap, shard_map, vmap) whose devices share the
        statistics; per-device sums and counts are summed, so unequal counts are
        exact.
      axis_index_groups: groups of devices along ``axis_name`` (pmap only).
      unbiased_running_var: store the running variance with Bessel's correction
        n/(n-1) while normalizing with the biased batch variance, as torch does.
      residual: what the backward pass keeps: ``"input"`` (x) or ``"output"`` (y,
        the In-Place Activated BatchNorm trick: free when the next layer keeps y
        anyway). With ``"output"``, x̂ is rebuilt as (y - β)/γ, so the forward pass
        uses ±``min_scale`` where |γ| < ``min_scale``, and γ's gradient passes
        straight through.
      min_scale: smallest |γ| used with ``residual="output"`` (default 1e-3).
      dtype: output dtype (default: ``x``'s dtype).
      autodiff: use the plain two-pass reference and JAX's own differentiation
        instead of the custom_vjp: slower, keeps more memory, but allows forward
        mode.
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): in training mode,
        split axis 0 of ``x`` into groups of this many examples, each normalized
        with its own statistics. The running statistics are updated with the
        count-weighted means over the groups of their means and variances. Axis 0
        must be reduced and divisible by it; not with ``axis_name``.
      renorm: batch renormalization (Ioffe 2017): in training mode
        y = γ((x - μ_B)/σ_B · r + d) + β with r = clip(σ_B/σ, 1/rmax, rmax) and
        d = clip((μ_B - μ)/σ, -dmax, dmax) held constant for differentiation,
        where μ, σ = √(var + ε) are the running statistics before this step's
        update. rmax=1, dmax=0 is plain batch norm.
      rmax: renorm's bound on r, >= 1 (default 3.0; inf: no bound). A Python float
        or a scalar array, so it can follow a schedule under jit.
      dmax: renorm's bound on |d|, >= 0 (default 5.0); like ``rmax``.

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape, and the updated running
      statistics (``state`` itself when ``train=False``).
    """
    x = _check_x(x)
    train = _check_train(train)
    cfg, feature_axes = _make_config(
        x,
        axis,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        residual=residual,
        min_scale=min_scale,
        dtype=dtype,
    )
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    bshape = _feature_broadcast_shape(x.shape, cfg.reduce_axes)
    scale, bias = _check_params(params, feature_shape, x.shape, feature_axes)
    _check_momentum(momentum)
    state = _check_state(
        state, feature_shape, x.shape, feature_axes, need_count=train and momentum is None
    )
    mask = _check_mask(mask, x.shape)
    cd = _compute_dtype(x.dtype)
    scale, bias = _affine(scale, bias, bshape, cd)
    virtual_batch_size = _check_virtual_batch_size(virtual_batch_size, feature_axes, cfg.axis_name)
    renorm = _check_renorm(renorm, rmax, dmax)

    if not train:
        mean = lax.stop_gradient(state["mean"]).astype(cd).reshape(bshape)
        var = lax.stop_gradient(state["var"]).astype(cd).reshape(bshape)
        a = scale.astype(cd) * lax.rsqrt(var + cfg.epsilon)
        y = (x.astype(cd) - mean) * a + bias.astype(cd)
        return y.astype(cfg.out_dtype), dict(state)

    if virtual_batch_size is not None or renorm:
        return _bn_train_ghost_renorm(
            x,
            scale,
            bias,
            mask,
            state,
            cfg,
            feature_axes,
            feature_shape,
            virtual_batch_size=virtual_batch_size,
            renorm=renorm,
            rmax=rmax,
            dmax=dmax,
            momentum=momentum,
            unbiased=unbiased_running_var,
            autodiff=autodiff,
        )
    reduction = math.prod(x.shape[a] for a in cfg.reduce_axes) * _axis_size(cfg.axis_name)
    if reduction <= 1:
        raise ValueError(
            f"Expected more than 1 value per feature when training, got x of shape {x.shape} "
            f"with feature axes {feature_axes}: each feature has {reduction} value(s)"
        )
    train_fn = _bn_train_reference if autodiff else _bn_train
    y, mean, var, n = train_fn(x, scale, bias, mask, cfg)
    new_state = _update_running(state, mean, var, n, momentum, unbiased_running_var, feature_shape)
    return y, new_state


def _update_running(state, mean, var, n, momentum, unbiased, feature_shape) -> dict[str, Array]:
    mean, var, n = (lax.stop_gradient(v).reshape(feature_shape) for v in (mean, var, n))
    if unbiased:
        var = var * (n / jnp.maximum(n - 1, 1))
    old_mean, old_var = (lax.stop_gradient(state[k]) for k in ("mean", "var"))
    new = dict(state)
    if momentum is None:
        count = state["count"] + 1
        w = 1.0 / count.astype(mean.dtype)
        new_mean = (1.0 - w) * old_mean + w * mean
        new_var = (1.0 - w) * old_var + w * var
        new["count"] = count
    else:
        new_mean = momentum * old_mean + (1.0 - momentum) * mean
        new_var = momentum * old_var + (1.0 - momentum) * var
    # A feature with no unmasked entry anywhere keeps its running statistics.
    seen = n > 0
    new["mean"] = jnp.where(seen, new_mean, old_mean).astype(old_mean.dtype)
    new["var"] = jnp.where(seen, new_var, old_var).astype(old_var.dtype)
    return new
