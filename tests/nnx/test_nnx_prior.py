"""jbn.nnx.use_prior and Tent on a flax NNX model (flax.nnx.BatchNorm) and a converted one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jbn
from tests.np_reference import np_prior


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(3, rngs=rngs)
        self.linear = nnx.Linear(3 * 16, 5, rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv(x)))
        return self.head(self.bn2(self.linear(h.reshape(len(x), -1))))


X = 1.0 + jax.random.normal(jax.random.key(0), (6, 4, 4, 2))


def net():
    model = Net(nnx.Rngs(0))
    model(X * 0.5)  # training mode: non-trivial running statistics
    model.eval()
    return model


def manual(model, x, prior, form):
    h = model.conv(x)
    b = model.bn1
    h = np_prior(h, b.scale[...], b.bias[...], b.mean[...], b.var[...], prior, form)
    h = model.linear(nnx.relu(jnp.asarray(h, jnp.float32)).reshape(len(x), -1))
    b = model.bn2
    h = np_prior(h, b.scale[...], b.bias[...], b.mean[...], b.var[...], prior, form)
    return model.head(jnp.asarray(h, jnp.float32))


@pytest.mark.parametrize("converted", [False, True])
def test_use_prior_matches_numpy_and_takes_out(converted):
    model = net()
    if converted:
        model = jbn.nnx.convert(model)
    want_eval = model(X)
    stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    for prior, form in ((0.0, "pooled"), (5.0, "linear"), (5.0, "pooled"), (np.inf, "pooled")):
        want = manual(model, X, prior, form)
        jbn.nnx.use_prior(model, prior, prior_form=form)
        model.train()  # the prior overrides the mode: nothing is updated
        np.testing.assert_allclose(model(X), want, rtol=1e-4, atol=1e-4)
        model.eval()
    jax.tree.map(np.testing.assert_array_equal, stats, nnx.state(model, nnx.BatchStat))
    assert isinstance(model.bn1, jbn.nnx.BatchNorm)
    jbn.nnx.use_prior(model, None)
    np.testing.assert_allclose(model(X), want_eval, rtol=1e-6, atol=1e-6)
    # A part of the model: only the head's batch norm.
    jbn.nnx.use_prior(model.bn2, 0.0)
    assert model.bn1.prior is None and model.bn2.prior == 0.0


def test_tent_moves_only_batch_norm_parameters():
    model = net()
    source = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    tent = jbn.nnx.Tent(model, tx=optax.adam(1e-2))
    for _ in range(3):
        tent.update(X)
    after = nnx.state(model, nnx.Param)
    for (path, a), b in zip(nnx.to_flat_state(source), jax.tree.leaves(after), strict=True):
        is_bn = path[0] in ("bn1", "bn2")
        assert (np.asarray(a).tobytes() == np.asarray(b).tobytes()) != is_bn, path
    np.testing.assert_allclose(tent.predict(X), model(X), rtol=1e-5, atol=1e-6)
    tent.reset()
    np.testing.assert_array_equal(model.bn1.scale[...], source["bn1"]["scale"][...])


def test_tent_with_the_stream_statistics():
    stream = jbn.Stream(50.0, 8.0)
    model, reference = net(), net()
    tent = jbn.nnx.Tent(model, tx=optax.adam(1e-2), stream=stream)
    start = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    tent.update(X)
    # The step's forward ran the source parameters in the stream mode: the memory is the step's.
    jbn.nnx.use_stream(reference, stream)
    nnx.jit(lambda module, x: module(x))(reference, X)  # compiled: its memory updates too
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
        jax.tree.leaves(nnx.state(reference, nnx.BatchStat)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(model.bn1.stream_mean[...], start["bn1"]["stream_mean"][...])
    tent.reset()
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.BatchStat)), jax.tree.leaves(start), strict=True
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(ValueError, match="not both"):
        jbn.nnx.Tent(net(), prior=4.0, stream=stream)
