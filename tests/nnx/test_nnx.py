"""jbn.nnx.BatchNorm against flax.nnx.BatchNorm(use_fast_variance=False): same models, same numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_trees_close, perturb_model

import jbn

FLAX_BN = functools.partial(nnx.BatchNorm, use_fast_variance=False)


class MLP(nnx.Module):
    def __init__(self, norm, *, rngs):
        self.dense1 = nnx.Linear(5, 8, rngs=rngs)
        self.bn1 = norm(8, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
        self.bn2 = norm(8, use_scale=False, epsilon=1e-3, rngs=rngs)
        self.dense3 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.dense1(x)))
        return self.dense3(nnx.relu(self.bn2(self.dense2(x))))


class CNN(nnx.Module):
    def __init__(self, norm, *, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = norm(4, momentum=0.9, rngs=rngs)
        self.dense1 = nnx.Linear(3 * 3 * 4, 8, use_bias=False, rngs=rngs)
        self.bn2 = norm(8, rngs=rngs)
        self.dense2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.bn1(self.conv(x))), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return self.dense2(nnx.relu(self.bn2(self.dense1(x))))


MODELS = {"mlp": (MLP, (12, 5)), "cnn": (CNN, (6, 6, 6, 2))}


def run(model, x, weights):
    """Per mode (train, eval): output, new batch statistics, gradients w.r.t. params and x."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, x):
        out = {}
        for train in (True, False):
            m = nnx.merge(graphdef, state)
            m.train() if train else m.eval()

            def loss(m, x):
                y = m(x)
                return jnp.sum(jnp.sin(y) * weights), y

            (_, y), (g_model, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
            out[train] = (y, nnx.state(m, nnx.BatchStat), (g_model, g_x))
        return out

    return both(state, x)


@pytest.mark.parametrize("name", MODELS)
def test_model_matches_flax(name):
    cls, shape = MODELS[name]
    kx, kw = jax.random.split(jax.random.key(0), 2)
    x = 1.0 + 2.0 * jax.random.normal(kx, shape)
    flax_model = cls(FLAX_BN, rngs=nnx.Rngs(0))
    jbn_model = cls(jbn.nnx.BatchNorm, rngs=nnx.Rngs(0))
    # Same variables from the same seeds: names, types, shapes, dtypes, values.
    s_f, s_j = nnx.state(flax_model), nnx.state(jbn_model)
    assert jax.tree.structure(s_f) == jax.tree.structure(s_j)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), s_f, s_j)
    perturb_model(flax_model, 0)
    nnx.update(jbn_model, nnx.state(flax_model))  # flax's state loads into jbn's model
    weights = jax.random.normal(kw, (shape[0], 3))
    out_f, out_j = run(flax_model, x, weights), run(jbn_model, x, weights)
    for train in (True, False):
        assert_trees_close(out_j[train][0], out_f[train][0])
        assert_trees_close(out_j[train][1], out_f[train][1])
        assert_trees_close(out_j[train][2], out_f[train][2])


def test_train_eval_view_and_call_override():
    bn = jbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 3)) + 2.0
    assert bn.use_running_average is False  # flax's default: training
    bn.eval()
    y = bn(x)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)  # initial statistics
    np.testing.assert_array_equal(bn.mean[...], 0.0)
    bn(x, use_running_average=False)  # the call overrides the attribute
    np.testing.assert_allclose(bn.mean[...], 0.5 * np.asarray(x, np.float64).mean(0), rtol=1e-6)
    view = nnx.view(bn, use_running_average=False)
    assert view.use_running_average is False and bn.use_running_average is True
    bn.train()
    assert bn.use_running_average is False
    with pytest.raises(ValueError, match="use_running_average"):
        jbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)


DTYPE_CASES = {
    "bf16_x": dict(x=jnp.bfloat16),
    "dtype_bf16": dict(x=jnp.float32, dtype=jnp.bfloat16),
    "param_bf16_no_affine": dict(x=jnp.bfloat16, param_dtype=jnp.bfloat16, use_scale=False),
}


@pytest.mark.parametrize("case", DTYPE_CASES)
def test_dtypes_follow_flax(case):
    kw = dict(DTYPE_CASES[case])
    x = (1.0 + jax.random.normal(jax.random.key(3), (16, 4))).astype(kw.pop("x"))
    f = FLAX_BN(4, momentum=0.9, rngs=nnx.Rngs(0), **kw)
    j = jbn.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0), **kw)
    perturb_model(f, 4)
    nnx.update(j, nnx.state(f))
    for train in (True, False):
        y_f, y_j = f(x, use_running_average=not train), j(x, use_running_average=not train)
        assert y_j.dtype == y_f.dtype
        np.testing.assert_allclose(
            np.asarray(y_j, np.float32), np.asarray(y_f, np.float32), rtol=2e-2, atol=2e-2
        )
    assert jax.tree.map(lambda a: a.dtype, nnx.state(j)) == jax.tree.map(
        lambda a: a.dtype, nnx.state(f)
    )
    assert_trees_close(nnx.state(j, nnx.BatchStat), nnx.state(f, nnx.BatchStat), rtol=1e-5)


def test_cumulative_average_and_options():
    bn = jbn.nnx.BatchNorm(3, momentum=None, use_bias=False, rngs=nnx.Rngs(0))
    assert bn.count.shape == (3,) and (bn.count[...] == 0).all() and bn.bias is None
    xs = [3.0 * jax.random.normal(jax.random.key(i), (8, 3)) + i for i in range(3)]
    step = nnx.jit(lambda m, x: m(x))
    for x in xs:
        step(bn, x)
    assert (bn.count[...] == 3).all()
    x64 = np.asarray(xs, np.float64)
    np.testing.assert_allclose(bn.mean[...], x64.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], x64.var(axis=1).mean(axis=0), rtol=1e-5)
    # Ghost batches and renorm reach the core through the module.
    ghost = jbn.nnx.BatchNorm(3, virtual_batch_size=4, rngs=nnx.Rngs(0))
    y = ghost(xs[0])
    np.testing.assert_allclose(y[:4].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y[4:].mean(0), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide"):
        ghost(xs[0][:6])
    renorm = jbn.nnx.BatchNorm(3, renorm=True, rngs=nnx.Rngs(0))
    plain = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(renorm(xs[2], rmax=1.0, dmax=0.0), plain(xs[2]))
    with pytest.raises(ValueError, match="num_features"):
        jbn.nnx.BatchNorm(0, rngs=nnx.Rngs(0))
