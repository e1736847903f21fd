"""Argument checks: one clear error per bad input, raised before any work is spent.

Every check here is static (shapes, dtypes, Python values), so it costs nothing
under :func:`jax.jit`. The public functions and the frontends call these and
nothing else to validate what a user passed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal, TypeGuard, get_args, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer
from jax.typing import ArrayLike

Array = jax.Array

# What the backward pass keeps: the input x or the output y.
Residual = Literal["input", "output"]
RESIDUALS: tuple[Residual, ...] = get_args(Residual)
PriorForm = Literal["pooled", "linear"]
PRIOR_FORMS: tuple[PriorForm, ...] = get_args(PriorForm)
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


def real(
    value: Any,
    name: str,
    *,
    low: float,
    strict: bool = False,
    high: float = math.inf,
    finite: bool = False,
    hint: str = "",
) -> float:
    """A Python float in [low, high] (low excluded when ``strict``; finite when asked)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.generic)):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    value = float(value)
    bounds = f"{'>' if strict else '>='} {float(low)}"
    if high < math.inf:
        bounds += f" and <= {float(high)}"
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {bounds}, got {value}{hint}")
    if not (value > low if strict else value >= low) or not value <= high:
        raise ValueError(f"{name} must be {bounds}, got {value}{hint}")
    return value


def momentum(value: Any, name: str = "momentum") -> None:
    """A running-average decay in [0, 1], None (cumulative) or a traced scalar."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(
        value, (numbers.Real, np.ndarray, np.generic, jax.Array)
    ):
        raise TypeError(f"{name} must be a Python float in [0, 1] or None, got {value!r}")
    shape = () if isinstance(value, numbers.Real) else jnp.shape(value)
    if shape != ():
        raise ValueError(
            f"{name} must be a scalar (one decay for every feature) in [0, 1] or None, got an "
            f"array of shape {shape}"
        )
    if isinstance(value, Tracer):
        return
    real(
        float(value),
        name,
        low=0.0,
        high=1.0,
        hint=" (new = momentum * old + (1 - momentum) * batch)",
    )


def static_float(value: Any, name: str, *, positive: bool) -> float:
    """A finite Python float, > 0 (``positive``) or >= 0: a static setting."""
    return real(value, name, low=0.0, strict=positive, finite=True)


def positive_float(value: Any, name: str) -> float:
    """A finite Python float > 0 (``epsilon``, ``min_scale``)."""
    return real(value, name, low=0.0, strict=True, finite=True)


def bound(value: Any, name: str, low: float) -> Any:
    """A bound >= ``low`` (inf: none): a float or a scalar array (e.g. a schedule's)."""
    if isinstance(value, bool) or not isinstance(
        value, (numbers.Real, np.ndarray, np.generic, jax.Array)
    ):
        raise TypeError(
            f"{name} must be a float (or a scalar array, e.g. from a schedule), got {value!r}"
        )
    shape = () if isinstance(value, numbers.Real) else jnp.shape(value)
    if shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {shape}")
    if not isinstance(value, Tracer) and not float(value) >= low:
        raise ValueError(f"{name} must be >= {low} (inf for no clipping), got {float(value)}")
    return value


def rmax(value: Any, name: str = "rmax") -> Any:
    """Renorm's bound on r: >= 1."""
    return bound(value, name, 1.0)


def dmax(value: Any, name: str = "dmax") -> Any:
    """Renorm's bound on |d|: >= 0."""
    return bound(value, name, 0.0)


@overload
def positive_int(value: Any, name: str, *, allow_none: Literal[False]) -> int: ...
@overload
def positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None: ...


def positive_int(value: Any, name: str, *, allow_none: bool = True) -> int | None:
    """A positive Python int (or None where allowed)."""
    if value is None and allow_none:
        return None
    what = "a positive int" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {what}, got {value}")
    return int(value)


def named_axes(value: Any, name: str = "axis_name") -> Any:
    """The named batch axis (or a tuple of names) a layer reduces over: hashable, not None."""
    value = tuple(value) if isinstance(value, list) else value
    if value is None or (isinstance(value, tuple) and not value):
        raise ValueError(
            f"{name} must name the batch axis of the vmap / pmap / shard_map the layer runs "
            f"under (e.g. 'batch'), or a tuple of names; got {value!r}"
        )
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (a name or a tuple of names), got {value!r}"
        ) from None
    return value


def python_bool(value: Any, name: str, hint: str = "") -> bool:
    """A Python (or NumPy) bool: any other value, even a truthy one, is an error."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {value!r}{hint}")
    return bool(value)


def train(value: Any) -> bool:
    """The train flag: a Python bool (it selects a different computation)."""
    return python_bool(
        value,
        "train",
        "; under jax.jit make it static, e.g. jax.jit(step, static_argnames='train')",
    )


def _is_residual(value: object) -> TypeGuard[Residual]:
    return isinstance(value, str) and value in RESIDUALS


def residual(value: Any, name: str = "residual") -> Residual:
    if not _is_residual(value):
        raise ValueError(f"{name} must be 'input' or 'output', got {value!r}")
    return value


def axis_name(value: Any) -> Any:
    """A hashable axis name: a name, a tuple of names, or None."""
    return tuple(value) if isinstance(value, list) else value


def axis_index_groups(value: Any, name: Any) -> tuple[tuple[int, ...], ...] | None:
    if value is None:
        return None
    if name is None:
        raise ValueError(
            "axis_index_groups needs axis_name: it groups the devices of that named axis"
        )
    try:
        return tuple(tuple(int(i) for i in group) for group in value)
    except TypeError:
        raise TypeError(
            f"axis_index_groups must be a sequence of sequences of ints, got {value!r}"
        ) from None


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


def _bound(name: Any) -> bool:
    """Whether ``name`` (a name or a tuple of names) is bound here by pmap, shard_map or vmap."""
    try:
        lax.axis_size(name)
    except NameError:
        return False
    return True


def axis_size(name: Any, fn: str = "bn_forward", otherwise: str = "leave axis_name=None") -> int:
    """The number of devices along ``name`` (1 for None); a clear error if it is not bound.

    The one axis check: ``fn`` is the function the message tells to call inside
    a mapped axis, ``otherwise`` what to do instead.
    """
    if name is None:
        return 1
    if not _bound(name):
        raise ValueError(
            f"axis_name={name!r} is not bound here: call {fn} inside pmap, shard_map or vmap "
            f"with that axis_name, or {otherwise}"
        )
    return int(lax.axis_size(name))


def bound_axis_name(name: Any) -> Any:
    """``name`` if it is bound here (pmap, shard_map, vmap), else None."""
    return name if name is not None and _bound(name) else None


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


def virtual_batch_size(value: Any, axes: tuple[int, ...], name: Any) -> int | None:
    value = positive_int(value, "virtual_batch_size")
    if value is None:
        return None
    if 0 in axes and name is None:
        raise ValueError(
            "virtual_batch_size splits axis 0 (the batch) into ghost batches, but axis 0 is a "
            f"feature axis here (feature axes {axes})"
        )
    return value


def renorm(value: Any, rmax_value: Any, dmax_value: Any) -> bool:
    flag = python_bool(value, "renorm")
    rmax(rmax_value)
    dmax(dmax_value)
    return flag


def passes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"passes must be a positive int, got {value!r}")
    return value


def prior(value: Any, train: bool) -> Array | None:
    """The prior count N of test-time adaptation: None, a number >= 0 (inf allowed), a scalar."""
    if value is None:
        return None
    if train:
        raise ValueError(
            f"prior={value!r} selects prior-weighted statistics, a mode of evaluation: pass "
            "train=False with it (training normalizes with the batch statistics alone)"
        )
    if isinstance(value, bool) or not isinstance(
        value, (numbers.Real, np.ndarray, np.generic, jax.Array)
    ):
        raise TypeError(
            f"prior must be a number of examples >= 0 (inf: the running statistics alone) or a "
            f"scalar array, got {value!r}"
        )
    shape = getattr(value, "shape", ())  # a Python number's is ()
    if shape != ():
        raise ValueError(f"prior must be a scalar, got shape {shape}")
    if not isinstance(value, Tracer) and not float(value) >= 0.0:
        raise ValueError(
            f"prior must be >= 0 (0: the batch statistics, inf: the running statistics), got "
            f"{float(value)}"
        )
    return jnp.asarray(value, jnp.float32)


def prior_option(value: Any, name: str = "prior") -> Any:
    """A prior as an option: None or a number >= 0 (a Python float), or a scalar array as given."""
    prior(value, False)
    if isinstance(value, (numbers.Real, np.generic)):
        return float(value)  # hashable: a static field of an Equinox layer
    return value


def prior_form(value: Any, name: str = "prior_form") -> str:
    if value not in PRIOR_FORMS:
        raise ValueError(
            f"prior_form must be one of {PRIOR_FORMS} ('pooled': Chan's exact pooling of the "
            f"running and batch statistics; 'linear': the paper's mix), got {value!r}"
        )
    return value


def found_batch_norms(count: int, tool: str, kinds: str) -> None:
    """A tool that walks a model refuses one in which it found no batch norm."""
    if not count:
        raise ValueError(
            f"{tool} found no batch norm in the model: it looks for {kinds}, and the model has "
            "none, so there is nothing to change"
        )


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
