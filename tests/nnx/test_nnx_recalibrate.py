"""jbn.nnx.recalibrate_batch_stats: an NNX model's running statistics replaced by the
population statistics of the data, in place; errors leave the model as it was.

The reference is NumPy float64 (tests/np_reference.py) on the concatenated batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import recalibration_batches as _batches
from np_reference import np_stats

import jbn


class NnxMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.dense1 = nnx.Linear(4, 6, rngs=rngs)
        self.bn1 = jbn.nnx.BatchNorm(6, rngs=rngs)
        self.dense2 = nnx.Linear(6, 5, rngs=rngs)
        self.bn2 = jbn.nnx.BatchNorm(5, momentum=None, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))


def test_nnx_recalibrate_matches_numpy():
    model = NnxMLP(rngs=nnx.Rngs(0))
    model.bn1.mean[...] += 5.0
    batches = _batches()
    params_before = nnx.clone(nnx.state(model, nnx.Param))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h1 = np.concatenate(
        [f64(x) @ f64(model.dense1.kernel[...]) + f64(model.dense1.bias[...]) for x in batches]
    )
    m1, v1, _ = np_stats(h1)
    model.eval()
    jbn.nnx.recalibrate_batch_stats(model, batches, passes=2)
    np.testing.assert_allclose(model.bn1.mean[...], m1.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn1.var[...], v1.ravel(), rtol=1e-5)
    a = np.maximum((h1 - m1) / np.sqrt(v1 + 1e-5), 0)  # scale 1, bias 0 at init
    m2, v2, _ = np_stats(a @ f64(model.dense2.kernel[...]) + f64(model.dense2.bias[...]))
    np.testing.assert_allclose(model.bn2.mean[...], m2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn2.var[...], v2.ravel(), rtol=1e-5)
    assert (model.bn2.count[...] == 3).all() and isinstance(model.bn1, jbn.nnx.BatchNorm)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)
    with pytest.raises(ValueError, match="no jbn.nnx.BatchNorm"):
        jbn.nnx.recalibrate_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches)


def test_nnx_recalibrate_errors_leave_the_model_as_it_was():
    model = NnxMLP(rngs=nnx.Rngs(0))
    bn1 = model.bn1
    before = nnx.clone(nnx.state(model))
    with pytest.raises(ValueError, match="passes must be a positive int"):
        jbn.nnx.recalibrate_batch_stats(model, [jnp.ones((2, 4))], passes=True)
    with pytest.raises(ValueError, match="on pass 2"):
        jbn.nnx.recalibrate_batch_stats(model, iter([jnp.ones((2, 4))]), passes=2)
    with pytest.raises(ValueError, match=r"not recalibrated: \['bn2'\]"):
        jbn.nnx.recalibrate_batch_stats(
            model, [jnp.ones((2, 4))], forward=lambda m, x: m.bn1(m.dense1(x))
        )
    # A failed second pass (a generator runs dry) writes nothing either.
    with pytest.raises(ValueError, match="on pass 2"):
        jbn.nnx.recalibrate_batch_stats(model, (b for b in [jnp.ones((2, 4))]), passes=2)
    assert model.bn1 is bn1  # the wrappers are gone after an error too
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
