"""Arrays and shapes: the input, its feature axes, the per-feature variables, masks."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jax.Array

PARAM_KEYS = ("scale", "bias")
STATE_KEYS = ("mean", "var", "count")


def feature_shape(value: Any, name: str = "feature_shape") -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints, each > 0) as a tuple of sizes."""
    shape = (value,) if isinstance(value, numbers.Integral) else value
    try:
        shape = tuple(shape)
    except TypeError:
        shape = ()
    if not shape or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) > 0 for s in shape
    ):
        raise ValueError(f"{name} must be a positive int or tuple of positive ints, got {value!r}")
    return tuple(int(s) for s in shape)


def feature_axes(axis: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The feature axes ``axis`` names in an array of ``shape``: sorted, non-negative."""
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
        if not -ndim <= int(a) < ndim:
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


def features_match(
    x_shape: tuple[int, ...], axis: Any, feature_shape: tuple[int, ...], layer: str
) -> None:
    """A layer's check, in its own terms, that ``x``'s feature axes have its feature sizes.

    Args:
      x_shape: the shape of the ``x`` the user passed.
      axis: the layer's feature axis or axes.
      feature_shape: the sizes the layer's variables have.
      layer: the layer as the user wrote it, e.g. ``"jbn.nnx.BatchNorm(num_features=3, axis=-1)"``.
    """
    axes = feature_axes(axis, x_shape)
    got = tuple(x_shape[a] for a in axes)
    if got == tuple(feature_shape):
        return
    hint = ""
    if len(feature_shape) == 1:
        # The likely fix: the axis that has the size (channels first: axis=1).
        fits = [a for a in range(1, len(x_shape)) if x_shape[a] == feature_shape[0]]
        if fits:
            where = " (channels first, e.g. NCHW)" if fits[0] == 1 else ""
            hint = f"; axis {fits[0]} has size {feature_shape[0]}: pass axis={fits[0]}{where}"
    raise ValueError(
        f"{layer} got x of shape {x_shape}, whose feature axis {axis!r} has size(s) {got}, but "
        f"the layer's variables have the feature shape {tuple(feature_shape)}{hint}"
    )


def input_array(x: ArrayLike) -> Array:
    """``x`` as a floating-point (or complex) array: integer and bool inputs become float32.

    flax's rule (``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` promote an
    integer input to the float dtype they compute in), so that ``intercept()`` and
    ``convert`` stay drop-ins.
    """
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number, list, tuple)):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        if not jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.bool_:
            raise TypeError(
                f"x must have a numeric dtype, got {x.dtype} (shape {x.shape}); floating-point, "
                "complex, integer and bool inputs work"
            )
        x = x.astype(jnp.float32)
    return x


def floating_dtype(
    dtype: Any, name: str = "dtype", *, allow_none: bool = False, allow_complex: bool = False
) -> Any:
    """``dtype`` as a numpy floating (or, where allowed, complex) dtype, or None where allowed."""
    if dtype is None and allow_none:
        return None
    kind = jnp.inexact if allow_complex else jnp.floating
    if dtype is None or not jnp.issubdtype(dtype, kind):
        what = "floating-point" + (" or complex" if allow_complex else "")
        raise TypeError(
            f"{name} must be a {what} dtype{' or None' if allow_none else ''}, got {dtype}"
        )
    return jnp.dtype(dtype)


def vector(
    value: ArrayLike, name: str, shape: tuple[int, ...], needs: str, *, complex_ok: bool = False
) -> Array:
    """A per-feature array of exactly ``shape``: floating point (or complex where allowed)."""
    value = jnp.asarray(value)
    if value.shape != shape:
        raise ValueError(f"{name} has shape {value.shape}, but {needs} needs shape {shape}")
    if not jnp.issubdtype(value.dtype, jnp.inexact if complex_ok else jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def params(
    value: Any, shape: tuple[int, ...], needs: str, name: str = "params"
) -> tuple[Array | None, Array | None]:
    """``(scale, bias)`` from ``{"scale", "bias"}`` (either may be missing) or None."""
    if value is None:
        return None, None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a dict with 'scale' and/or 'bias', or None; got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(
            f"{name} has unknown keys {unknown}; expected 'scale' and/or 'bias' (flax's names)"
        )
    scale, bias = (
        None if value.get(k) is None else vector(value[k], f"{name}[{k!r}]", shape, needs)
        for k in PARAM_KEYS
    )
    return scale, bias


def state(
    value: Any, shape: tuple[int, ...], needs: str, *, need_count: bool, name: str = "state"
) -> dict[str, Array]:
    """The running statistics ``{"mean", "var"}`` (and ``"count"``), checked."""
    what = f"{name} must be a dict with the running 'mean' and 'var' (from jbn.bn_init)"
    if not isinstance(value, Mapping):
        raise TypeError(f"{what}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(STATE_KEYS))
    if unknown:
        raise ValueError(
            f"{name} has unknown keys {unknown}; expected 'mean', 'var' and optionally 'count'"
        )
    out = {}
    for key in ("mean", "var"):
        if key not in value:
            raise ValueError(f"{name} is missing {key!r}: {what}")
        # A running mean of complex inputs is complex (as in flax); the variance is real.
        out[key] = vector(value[key], f"{name}[{key!r}]", shape, needs, complex_ok=key == "mean")
    if "count" in value:
        count = jnp.asarray(value["count"])
        if count.shape not in ((), shape) or not jnp.issubdtype(count.dtype, jnp.integer):
            raise ValueError(
                f"{name}['count'] must be an integer array of the feature shape {shape} (or a "
                f"scalar, from an older checkpoint), got shape {count.shape} dtype {count.dtype}"
            )
        out["count"] = count
    elif need_count:
        raise ValueError(
            "momentum=None (cumulative moving average) and debias=True need state['count']; "
            "create the state with jbn.bn_init(feature_shape, cumulative=True)"
        )
    return out


def state_entries(
    entries: Mapping[str, Any],
    names: tuple[str, ...],
    what: str,
    hint: str,
    shape: tuple[int, ...],
    needs: str,
) -> dict[str, Array]:
    """A mode's own entries of the state (``names``: all or none), each of the feature shape.

    ``what`` names them in the error (e.g. "stream memory") and ``hint`` says
    how to get a whole set.
    """
    missing = [k for k in names if k not in entries]
    if entries and missing:
        raise ValueError(
            f"state has a partial {what}, missing {missing}: pass all of {list(names)} or none "
            f"({hint})"
        )
    out = {}
    for key, value in entries.items():
        value = jnp.asarray(value)
        if value.shape != shape:
            raise ValueError(
                f"state[{key!r}] must have the feature shape {shape} for {needs}, got "
                f"shape {value.shape}"
            )
        out[key] = value
    return out


def mask(value: ArrayLike | None, x_shape: tuple[int, ...]) -> Array | None:
    """A boolean mask broadcast to ``x_shape`` (True counts), or None."""
    if value is None:
        return None
    value = jnp.asarray(value)
    if value.dtype != jnp.bool_:
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"mask must be boolean (True counts), got dtype {value.dtype}")
        value = value != 0
    ok = value.ndim <= len(x_shape) and all(
        m in (1, s) for m, s in zip(value.shape[::-1], x_shape[::-1], strict=False)
    )
    if not ok:
        raise ValueError(f"mask of shape {value.shape} does not broadcast to x of shape {x_shape}")
    return jnp.broadcast_to(value, x_shape)


def batch_not_empty(
    x_shape: tuple[int, ...], reduce_axes: tuple[int, ...], name: Any, what: str
) -> None:
    """An empty local batch is only meaningful when other devices share the statistics."""
    if name is None and any(x_shape[a] == 0 for a in reduce_axes):
        raise ValueError(
            f"{what} got x of shape {x_shape}, which has no value to reduce over (a reduced axis "
            "has size 0); an empty local batch is allowed only with axis_name, where other "
            "devices provide the statistics"
        )


def values_per_feature(
    values: int,
    x_shape: tuple[int, ...],
    axes: tuple[int, ...],
    virtual_batch_size: int | None = None,
) -> None:
    """Training needs more than one value per feature (per ghost batch)."""
    if values > 1:
        return
    if virtual_batch_size is None:
        where = f"feature axes {axes}: each feature has {values} value(s)"
    else:
        where = (
            f"feature axes {axes} and virtual_batch_size={virtual_batch_size}: "
            f"each feature has {values} value(s) per batch"
        )
    raise ValueError(
        f"Expected more than 1 value per feature when training, got x of shape {x_shape} "
        f"with {where}"
    )
