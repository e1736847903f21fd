"""Modes: the train flag, the prior of test-time adaptation, the backward pass's residual."""

from __future__ import annotations

import numbers
from typing import Any, Literal, TypeGuard, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._arrays import Array
from ._options import python_bool

# What the backward pass keeps: the input x or the output y.
Residual = Literal["input", "output"]
RESIDUALS: tuple[Residual, ...] = get_args(Residual)
PriorForm = Literal["pooled", "linear"]
PRIOR_FORMS: tuple[PriorForm, ...] = get_args(PriorForm)


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
