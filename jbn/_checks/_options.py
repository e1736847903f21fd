"""Options: the numbers, ints and bools a user sets, each checked as a static value."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


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


def static_float(value: Any, name: str, *, positive: bool) -> float:
    """A finite Python float, > 0 (``positive``) or >= 0: a static setting."""
    return real(value, name, low=0.0, strict=positive, finite=True)


def positive_float(value: Any, name: str) -> float:
    """A finite Python float > 0 (``epsilon``, ``min_scale``)."""
    return real(value, name, low=0.0, strict=True, finite=True)


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


def python_bool(value: Any, name: str, hint: str = "") -> bool:
    """A Python (or NumPy) bool: any other value, even a truthy one, is an error."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {value!r}{hint}")
    return bool(value)


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


def found_batch_norms(count: int, tool: str, kinds: str) -> None:
    """A tool that walks a model refuses one in which it found no batch norm."""
    if not count:
        raise ValueError(
            f"{tool} found no batch norm in the model: it looks for {kinds}, and the model has "
            "none, so there is nothing to change"
        )
