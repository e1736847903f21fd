"""jbn.linen.use_stream: the memory lives in batch_stats and matches the core's stream mode."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

import jbn

MODE = jbn.Stream(horizon=20.0, prior=4.0)


def test_memory_in_batch_stats_matches_the_core_and_resets():
    model = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
    x = jax.random.normal(jax.random.key(1), (3, 6, 2)) * 2 + 1
    variables = model.init(jax.random.key(0), x[0])
    bn_vars = {"scale": variables["params"]["layers_1"]["scale"],
               "bias": variables["params"]["layers_1"]["bias"]}  # fmt: skip

    @jax.jit
    @jbn.linen.use_stream(MODE)
    def run(v, x):
        return model.apply(v, x, mutable=["batch_stats"])

    v, state = variables, dict(variables["batch_stats"]["layers_1"])
    for xb in x:
        h = model.layers[0].apply({"params": variables["params"]["layers_0"]}, xb)
        want, state = jbn.bn_forward(bn_vars, state, h, MODE)
        y, updates = run(v, xb)
        v = {**v, **updates}
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
        for k in ("stream_mean", "stream_var", "stream_count"):
            np.testing.assert_allclose(v["batch_stats"]["layers_1"][k], state[k], rtol=1e-6)
    back = jbn.linen.reset_stream(v)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    with (
        pytest.raises(ValueError, match=r"pass mutable=\['batch_stats'\]"),
        jbn.linen.use_stream(MODE),
    ):
        model.apply(variables, x[0])
    with pytest.raises(TypeError, match="jbn.Stream"), jbn.linen.use_stream(16.0):  # type: ignore[arg-type]
        pass
