"""The one XLA:CPU-specific trick in jbn: an optimization barrier per reduction.

XLA:CPU fuses an elementwise producer into a reduction only when that reduction
is its single user. Two sums over ``x - k``, or over bfloat16 ``x`` converted to
float32 (which ``y`` and ``dx`` convert too), make it write ``x - k`` or the
float32 ``x`` to memory in full and read it back, and a per-feature vector can
become a full-size broadcast the same way. A barrier, which moves no data, gives
a sum its own copy of the name, so each sum reads ``x`` directly, once.

Identical barriers are merged by XLA, so each call site passes a different tuple
(e.g. ``(x,)`` and ``(x, x)``); the arrays of one call must vary along the same
mapped axes. Other backends fuse sibling reductions themselves: there the
barrier is the identity. What this buys is pinned by
``tests/test_xla_cpu.py`` (compiled temporary memory and bytes accessed).
"""

from __future__ import annotations

from typing import overload

import jax
from jax import lax

Array = jax.Array


@overload
def unshared(array: Array, /) -> Array: ...
@overload
def unshared(first: Array, second: Array, /, *rest: Array) -> tuple[Array, ...]: ...


def unshared(*arrays: Array) -> Array | tuple[Array, ...]:
    """The arrays, through an optimization barrier on XLA:CPU (unchanged elsewhere)."""
    out = lax.platform_dependent(
        *arrays, cpu=lambda *a: lax.optimization_barrier(a), default=lambda *a: a
    )
    return out[0] if len(arrays) == 1 else tuple(out)
