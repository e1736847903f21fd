"""jbn's NNX convert: flax.nnx.BatchNorm <-> jbn.nnx.BatchNorm in place, in any model graph."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jbn
from jbn.nnx._graph import replace_modules

convert = jbn.nnx.convert


class Block(nnx.Module):
    def __init__(self, rngs, **bn):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, scale_metadata={"tag": "block"}, rngs=rngs, **bn)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


class Net(nnx.Module):
    """Batch norms in a Sequential, a List of blocks, a data list, a Dict, a data tuple, shared."""

    def __init__(self, rngs, **bn):
        self.stem = nnx.Sequential(
            nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, use_bias=False, rngs=rngs, **bn), nnx.relu
        )
        self.blocks = nnx.List([Block(rngs, **bn), Block(rngs, **bn)])
        self.extra = nnx.data([nnx.BatchNorm(4, epsilon=1e-3, rngs=rngs, **bn)])
        self.heads = nnx.Dict({"a": nnx.BatchNorm(4, use_scale=False, rngs=rngs, **bn)})
        self.pair = nnx.data(
            (nnx.BatchNorm(4, axis=-1, rngs=rngs, **bn), nnx.Linear(4, 2, rngs=rngs))
        )
        self.shared = self.blocks[0].bn  # the same layer twice in the graph

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.extra[0](x)
        x = self.heads["a"](x)
        x = self.shared(x)
        return self.pair[1](self.pair[0](x))


X = 2.0 + jax.random.normal(jax.random.key(0), (8, 3))


def batch_norms(model, cls):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, cls)]


def perturb(model, seed=0):
    """Non-trivial parameters and running statistics, so eval mode is a real test."""
    rng = np.random.default_rng(seed)
    for layer in batch_norms(model, nnx.BatchNorm):
        layer.mean[...] = jnp.asarray(rng.standard_normal(4), jnp.float32)
        layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
        if layer.scale is not None:
            layer.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    return model


@nnx.jit
def step(model, x):
    """Loss, parameter gradient, output; updates the running statistics in train mode."""

    def loss(model):
        y = model(x)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return y, grads


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def stats(model):
    return nnx.state(model, nnx.BatchStat)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_both_ways_keeps_outputs_grads_and_state(mode):
    reference = perturb(Net(nnx.Rngs(0), use_fast_variance=False))
    model = perturb(Net(nnx.Rngs(0)))
    if mode == "eval":
        reference.eval()
        model.eval()
    original = nnx.clone(model)
    old_layers = batch_norms(model, nnx.BatchNorm)
    old_variables = [(layer.mean, layer.var, layer.scale, layer.bias) for layer in old_layers]

    assert convert(model) is model
    assert not batch_norms(model, nnx.BatchNorm)
    new_layers = batch_norms(model, jbn.nnx.BatchNorm)
    assert len(new_layers) == len(old_layers) == 6
    assert model.shared is model.blocks[0].bn  # still shared
    for old, new, variables in zip(old_layers, new_layers, old_variables, strict=True):
        assert (new.mean, new.var, new.scale, new.bias) == variables  # the same objects
        assert new.use_running_average is (mode == "eval")
        assert (new.epsilon, new.momentum, new.use_scale, new.use_bias) == (
            old.epsilon,
            old.momentum,
            old.use_scale,
            old.use_bias,
        )
    assert model.blocks[1].bn.scale.get_metadata()["tag"] == "block"

    # jbn's exact statistics against flax's exact-variance module: same numbers
    assert_close(step(model, X), step(reference, X))
    assert_close(stats(model), stats(reference))

    # and back: flax's own code again, on the variables jbn updated
    assert convert(model, to="flax") is model
    assert not batch_norms(model, jbn.nnx.BatchNorm)
    assert len(batch_norms(model, nnx.BatchNorm)) == 6
    assert model.shared is model.blocks[0].bn
    nnx.update(original, nnx.state(model))
    y, grads = step(model, X)
    y_original, grads_original = step(original, X)
    np.testing.assert_array_equal(y, y_original)
    assert_close(grads, grads_original, rtol=0, atol=0)


def test_optimizer_built_before_convert_still_steps():
    model = perturb(Net(nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    convert(model)
    _, grads = step(model, X)
    before = nnx.clone(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = nnx.state(model, nnx.Param)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, before, grads)
    assert_close(after, expected)


def test_a_batch_norm_itself_is_replaced():
    bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    new = convert(bn)
    assert isinstance(new, jbn.nnx.BatchNorm) and new.mean is bn.mean
    assert type(convert(new, to="flax")) is nnx.BatchNorm


def test_dtypes_survive():
    bn = nnx.BatchNorm(4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = convert(nnx.Sequential(bn))
    layer = model.layers[0]
    assert layer.scale[...].dtype == jnp.bfloat16 and layer.mean[...].dtype == jnp.float32
    assert layer(X[:, :1] * jnp.ones((1, 4))).dtype == jnp.bfloat16


class MyBatchNorm(nnx.BatchNorm):
    def __call__(self, x, use_running_average=None, *, mask=None):
        return 2 * super().__call__(x, use_running_average, mask=mask)


def test_subclass_raises_and_leaves_the_model_unchanged():
    model = Net(nnx.Rngs(0))
    model.blocks[1].bn = MyBatchNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="MyBatchNorm, a subclass of flax.nnx"):
        convert(model)
    assert not batch_norms(model, jbn.nnx.BatchNorm)  # checked before any change


def test_extra_attributes_raise():
    bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    bn.note = "mine"
    with pytest.raises(TypeError, match=r"attributes \['note'\]"):
        convert(bn)


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(residual="output"), "residual='output'"),
        (dict(renorm=True), "renorm=True"),
        (dict(virtual_batch_size=2), "virtual_batch_size=2"),
        (dict(unbiased_running_var=True), "unbiased_running_var=True"),
        (dict(momentum=None), "momentum=None"),
    ],
)
def test_jbn_only_options_cannot_go_to_flax(option, match):
    model = nnx.Sequential(
        jbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0)), jbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0), **option)
    )
    with pytest.raises(ValueError, match=f"cannot express {match}"):
        convert(model, to="flax")
    assert all(type(m) is jbn.nnx.BatchNorm for m in model.layers)


def test_several_feature_axes_cannot_go_to_flax():
    bn = jbn.nnx.BatchNorm((2, 4), axis=(1, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="several feature axes"):
        convert(bn, to="flax")
    one = jbn.nnx.BatchNorm((4,), rngs=nnx.Rngs(0))
    assert convert(one, to="flax").num_features == 4


def test_bad_target():
    with pytest.raises(ValueError, match="to must be 'jbn' or 'flax', got 'torch'"):
        convert(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), to="torch")


def test_replace_modules_is_generic():
    model = Net(nnx.Rngs(0))
    made = []

    def make(m):
        made.append(m)
        return nnx.Linear(4, 4, rngs=nnx.Rngs(1))

    replace_modules(model, lambda m: isinstance(m, nnx.BatchNorm), make)
    assert len(made) == 6  # the shared layer once
    assert model.shared is model.blocks[0].bn and isinstance(model.shared, nnx.Linear)
    assert isinstance(model.pair[0], nnx.Linear) and isinstance(model.pair, tuple)
    assert model(X).shape == (8, 2)
    assert replace_modules([1, "a"], lambda m: True, make) == [1, "a"]
