"""jbn.nnx.use_stream: the memory lives in nnx.BatchStat variables and matches the core's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import jbn

MODE = jbn.Stream(horizon=20.0, prior=4.0)


def test_memory_in_batch_stats_matches_the_core_and_resets():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(1)))
    model.eval()
    model = jbn.nnx.use_stream(model, MODE)
    bn = model.layers[1]
    start = {k: getattr(bn, k)[...] for k in ("stream_mean", "stream_var", "stream_count")}
    assert isinstance(bn.stream_mean, nnx.BatchStat)
    params = {"scale": bn.scale[...], "bias": bn.bias[...]}
    state = {"mean": bn.mean[...], "var": bn.var[...]}
    run = nnx.jit(lambda m, x: m(x))
    for xb in jax.random.normal(jax.random.key(2), (3, 6, 2)) * 2 + 1:
        want, state = jbn.bn_forward(params, state, model.layers[0](xb), MODE)
        np.testing.assert_allclose(run(model, xb), want, rtol=1e-6, atol=1e-6)
        for k in start:
            np.testing.assert_allclose(getattr(bn, k)[...], state[k], rtol=1e-6)
    jbn.nnx.reset_stream(model)
    for k, v in start.items():
        np.testing.assert_array_equal(getattr(bn, k)[...], v)
    model = jbn.nnx.use_stream(model, None)
    assert not hasattr(bn, "stream_mean") and bn.stream is None
    with pytest.raises(ValueError, match="found no batch norm"):
        jbn.nnx.use_stream(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), MODE)
