"""jbn.equinox.use_stream: the memory lives in the eqx.nn.State and matches the core's."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest

import jbn
import jbn.equinox

MODE = jbn.Stream(horizon=20.0, prior=4.0)


def test_memory_in_the_state_matches_the_core_and_resets():
    bn, state0 = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch", dtype=np.float32)
    bn, state = jbn.equinox.use_stream(eqx.nn.inference_mode(bn), state0, MODE)
    start = state.get(bn.state_index)

    @eqx.filter_jit
    def run(x, state):
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    params = {"scale": bn.weight, "bias": bn.bias}
    core = {"mean": start["mean"], "var": start["var"]}
    for xb in jax.random.normal(jax.random.key(2), (3, 6, 3)) * 2 + 1:
        want, core = jbn.bn_forward(params, core, xb, MODE)
        y, state = run(xb, state)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
        for k in ("stream_mean", "stream_var", "stream_count"):
            np.testing.assert_allclose(state.get(bn.state_index)[k], core[k], rtol=1e-6)
    back = jbn.equinox.reset_stream(bn, state).get(bn.state_index)
    for k, v in start.items():
        np.testing.assert_array_equal(back[k], v)
    plain, out = jbn.equinox.use_stream(bn, state, None)
    assert plain.stream is None and set(out.get(bn.state_index)) == set(state0.get(bn.state_index))
    with pytest.raises(ValueError, match="found no batch norm"):
        jbn.equinox.use_stream(eqx.nn.Linear(2, 3, key=jax.random.key(0)), state0, MODE)
    with pytest.raises(ValueError, match="no batch norm of the model is in the stream mode"):
        jbn.equinox.reset_stream(plain, out)
