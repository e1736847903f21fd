"""What the XLA:CPU optimization barriers (``jbn._xla_cpu.unshared``) buy, pinned.

The compiled forward + backward (``jax.jit(jax.grad(...))`` of ``vdot(y, dy)``
with respect to x and the parameters, the way users call a layer) must write no
temporary array of x's size and move only a few arrays' worth of bytes. The same
figures with the barriers turned into the identity are worse: that is what makes
these tests able to fail when a change defeats the barriers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jbn

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the barriers only act on XLA:CPU"
)

SHAPE = (64, 8, 8, 32)
# Measured with the barriers (jax 0.10.2): temp ~0.001x input, bytes accessed 8.0x
# input (f32) and 9.0x (bf16); without them 12x bytes (f32), and 4x temp, 23x bytes
# (bf16: the float32 copy of x is written and read back). The bounds leave modest
# headroom above the figures with barriers.
BOUNDS = {
    # dtype: (temp bytes / input bytes, bytes accessed / input bytes)
    "float32": (0.05, 10.0),
    "bfloat16": (0.05, 11.0),
}


def _figures(dtype) -> tuple[float, float]:
    """(temp bytes, bytes accessed) of the compiled fwd+bwd, each over x's bytes."""
    x = jax.random.normal(jax.random.key(0), SHAPE, dtype)
    dy = jax.random.normal(jax.random.key(1), SHAPE, dtype)
    params, state = jbn.bn_init(SHAPE[-1])

    def loss(x, params, dy):
        y, _ = jbn.bn_forward(params, state, x, True)
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32))

    # A fresh function each time: nothing is reused from an earlier trace.
    compiled = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1))).lower(x, params, dy)
    compiled = compiled.compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    temp = compiled.memory_analysis().temp_size_in_bytes
    return temp / x.nbytes, cost["bytes accessed"] / x.nbytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fwd_bwd_moves_few_bytes_and_writes_no_temporaries(dtype):
    temp, moved = _figures(jnp.dtype(dtype))
    max_temp, max_moved = BOUNDS[dtype]
    assert temp <= max_temp, f"temporary memory {temp:.3f}x the input (bound {max_temp}x)"
    assert moved <= max_moved, f"bytes accessed {moved:.2f}x the input (bound {max_moved}x)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_without_the_barriers_the_figures_are_worse(dtype, monkeypatch):
    """The test above can fail: with the barriers as the identity, XLA:CPU does worse."""
    with_barriers = _figures(jnp.dtype(dtype))
    # unshared() calls lax.optimization_barrier at trace time, so this reaches every call site.
    monkeypatch.setattr(jax.lax, "optimization_barrier", lambda operands: operands)
    jax.clear_caches()
    try:
        temp, moved = _figures(jnp.dtype(dtype))
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    max_temp, max_moved = BOUNDS[dtype]
    assert temp > max_temp or moved > max_moved, (
        f"without barriers: temp {temp:.3f}x, bytes {moved:.2f}x the input; "
        f"with: {with_barriers[0]:.3f}x, {with_barriers[1]:.2f}x"
    )
