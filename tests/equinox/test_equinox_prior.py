"""jbn.equinox.use_prior and Tent on a converted Equinox model (eqx.nn.BatchNorm, mode="batch")."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn.equinox
from tests.np_reference import np_prior


class Net(eqx.Module):
    conv: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    linear: eqx.nn.Linear
    bn2: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k[0])
        self.bn1 = eqx.nn.BatchNorm(3, "batch", mode="batch")
        self.linear = eqx.nn.Linear(3 * 16, 5, key=k[1])
        self.bn2 = eqx.nn.BatchNorm(5, "batch", mode="batch")
        self.head = eqx.nn.Linear(5, 3, key=k[2])

    def __call__(self, x, state):
        h, state = self.bn1(self.conv(x), state)
        h, state = self.bn2(self.linear(jax.nn.relu(h).reshape(-1)), state)
        return self.head(h), state


X = 1.0 + jax.random.normal(jax.random.key(0), (6, 2, 4, 4))


def converted():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(1))
    train = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    _, state = train(X * 0.5, state)  # non-trivial running statistics
    return jbn.equinox.convert(model, state)


def run(model, state, x):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


def manual(model, state, x, prior, form):
    """Layer by layer with the NumPy float64 reference."""
    r1 = state.get(model.bn1.state_index)
    r2 = state.get(model.bn2.state_index)
    h = jax.vmap(model.conv)(x)
    h = np_prior(h, model.bn1.weight, model.bn1.bias, r1["mean"], r1["var"], prior, form, axis=1)
    h = jax.vmap(model.linear)(jax.nn.relu(jnp.asarray(h, jnp.float32)).reshape(len(x), -1))
    h = np_prior(h, model.bn2.weight, model.bn2.bias, r2["mean"], r2["var"], prior, form)
    return jax.vmap(model.head)(jnp.asarray(h, jnp.float32))


@pytest.mark.parametrize("form", ["pooled", "linear"])
def test_use_prior_on_converted_model_matches_numpy(form):
    model, state = converted()
    for prior in (0.0, 5.0, np.inf):
        adapted = jbn.equinox.use_prior(model, prior, prior_form=form)
        y, new_state = run(adapted, state, X)
        np.testing.assert_allclose(y, manual(model, state, X, prior, form), rtol=1e-4, atol=1e-4)
        for index in (model.bn1.state_index, model.bn2.state_index):
            for k, v in state.get(index).items():
                np.testing.assert_array_equal(new_state.get(index)[k], v)
    # Taken out again: the model trains as before (batch statistics, updated state).
    back = jbn.equinox.use_prior(adapted, None)
    y_back, _ = run(back, state, X)
    y_model, _ = run(model, state, X)
    np.testing.assert_array_equal(y_back, y_model)
    # Inference mode is overridden by the prior; one example at a time works.
    one, _ = run(eqx.nn.inference_mode(jbn.equinox.use_prior(model, 4.0)), state, X[:1])
    np.testing.assert_allclose(
        one, manual(model, state, X[:1], 4.0, "pooled"), rtol=1e-4, atol=1e-4
    )


def test_use_prior_errors():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(1))
    with pytest.raises(TypeError, match="convert it first"):
        jbn.equinox.use_prior(model, 1.0)
    model, state = converted()
    with pytest.raises(ValueError, match="prior must be >= 0"):
        jbn.equinox.use_prior(model, -1.0)
    with pytest.raises(NameError, match="not bound"):
        jbn.equinox.use_prior(model.bn2, 1.0)(jnp.ones(5), state)


def test_tent_moves_only_batch_norm_parameters():
    model, state = converted()
    tent = jbn.equinox.Tent(model, state, tx=optax.adam(1e-2))
    for _ in range(3):
        tent.update(X)
    before = jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_inexact_array))
    after = jax.tree.leaves(eqx.filter(tent.model, eqx.is_inexact_array))
    for (path, a), b in zip(before, after, strict=True):
        is_bn = "bn" in jax.tree_util.keystr(path)
        assert (np.asarray(a).tobytes() == np.asarray(b).tobytes()) != is_bn, path
    logits = tent.step(X)
    np.testing.assert_allclose(logits, run(tent.model, state, X)[0], rtol=1e-5, atol=1e-6)
    tent.reset()
    np.testing.assert_array_equal(tent.model.bn1.weight, model.bn1.weight)


def test_tent_with_the_stream_statistics():
    stream = jbn.Stream(50.0, 8.0)
    model, state = converted()
    tent = jbn.equinox.Tent(model, state, tx=optax.adam(1e-2), stream=stream)
    start = tent.state
    tent.update(X)
    # The step's forward ran the source model in the stream mode: the memory is the step's.
    streaming, memory = jbn.equinox.use_stream(model, state, stream)
    _, want = eqx.filter_jit(run)(streaming, memory, X)  # compiled, not op by op
    for a, b in zip(jax.tree.leaves(tent.state), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert tent.model.bn1.stream == stream
    tent.reset()
    for a, b in zip(jax.tree.leaves(tent.state), jax.tree.leaves(start), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(ValueError, match="not both"):
        jbn.equinox.Tent(model, state, prior=4.0, stream=stream)
