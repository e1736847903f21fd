"""jbn.nnx.fold_batch_norms: NNX models folded in place, against the original model's own
evaluation-mode outputs; a failed fold leaves the model as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn.nnx


class CNN(nnx.Module):
    """A plain conv (no bias), a depthwise conv (bias), a transposed conv and a dense layer,
    each with a batch norm (flax's and jbn's), and one batch norm after an add."""

    def __init__(self, residual=False):
        rngs = nnx.Rngs(0)
        self.residual = residual
        self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
        self.bn2 = jbn.nnx.BatchNorm(4, rngs=rngs)
        self.up = nnx.ConvTranspose(4, 3, (2, 2), use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(3, epsilon=1e-3, rngs=rngs)
        self.dense = nnx.Linear(3, 5, rngs=rngs)
        self.bn4 = jbn.nnx.BatchNorm(5, rngs=rngs)
        self.after_add = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv(x)))
        y = self.depthwise(x)
        x = self.bn2(y) + y if self.residual else self.bn2(y)
        x = jnp.mean(nnx.relu(self.bn3(self.up(x))), axis=(1, 2))
        return self.after_add(self.bn4(self.dense(x)) + 1.0)


def _model(residual=False):
    model = CNN(residual)
    for i, bn in enumerate((model.bn1, model.bn2, model.bn3, model.bn4, model.after_add)):
        k = jax.random.split(jax.random.key(i), 4)
        c = bn.mean.shape
        bn.mean[...] = jax.random.normal(k[0], c)
        bn.var[...] = jax.random.uniform(k[1], c, minval=0.2, maxval=3.0)
        bn.scale[...] = 1.0 + 0.5 * jax.random.normal(k[2], c)
        bn.bias[...] = 0.5 * jax.random.normal(k[3], c)
    model.eval()
    return model


X = jax.random.normal(jax.random.key(9), (2, 6, 6, 2))


def test_cnn_folds_in_place_to_its_evaluation_outputs():
    model = _model()
    x2 = jax.random.normal(jax.random.key(3), (3, 6, 6, 2))
    run = nnx.jit(lambda model, x: model(x))
    y_ref = np.asarray(run(model, x2))
    report = jbn.nnx.fold_batch_norms(model, X)
    assert report.folded == (("conv", "bn1"), ("depthwise", "bn2"), ("up", "bn3"), ("dense", "bn4"))
    assert list(report.left) == ["after_add"]
    bns = [p for p, m in nnx.iter_graph(model) if isinstance(m, (nnx.BatchNorm, jbn.nnx.BatchNorm))]
    assert bns == [("after_add",)]
    assert model.conv.use_bias and model.conv.bias[...].shape == (4,)
    np.testing.assert_allclose(run(model, x2), y_ref, atol=1e-4 * np.abs(y_ref).max())


def test_failed_fold_leaves_the_model_as_it_was():
    """The depthwise conv's output also feeds the add: the check refuses, nothing changes."""
    model = _model(residual=True)
    before = jax.tree.map(np.asarray, nnx.state(model))
    graph_before = nnx.graphdef(model)
    with pytest.raises(ValueError, match=r"differs from the original by \d.*left as it was"):
        jbn.nnx.fold_batch_norms(model, X)
    assert nnx.graphdef(model) == graph_before
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)


def test_errors():
    with pytest.raises(ValueError, match="ran no batch norm"):
        jbn.nnx.fold_batch_norms(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), X)
    with pytest.raises(ValueError, match="no batch norm of the model can be folded"):
        rngs = nnx.Rngs(0)
        jbn.nnx.fold_batch_norms(nnx.Sequential(nnx.BatchNorm(2, rngs=rngs), nnx.relu), X)
    with pytest.raises(TypeError, match="model must be an NNX module"):
        jbn.nnx.fold_batch_norms(lambda x: x, X)  # pyright: ignore[reportArgumentType]
