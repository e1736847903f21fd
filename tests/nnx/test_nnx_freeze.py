"""Frozen batch norm for fine-tuning and the optax masks on NNX models, on flax's and
jbn's layers alike (jbn.nnx.freeze_batch_norms, unfreeze_batch_norms, batch_norm_mask).

The reference is the same model in evaluation mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import changed_leaves as _changed

import jbn
from jbn import optimize_only
from jbn.nnx import FrozenBatchNorm, freeze_batch_norms, unfreeze_batch_norms
from jbn.nnx import batch_norm_mask as nnx_batch_norm_mask

X = 1.0 + jax.random.normal(jax.random.key(0), (8, 3))


class NnxNet(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List(
            [nnx.Linear(4, 4, rngs=rngs), jbn.nnx.BatchNorm(4, use_scale=False, rngs=rngs)]
        )
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(nnx.relu(self.bn(self.linear(x))))
        x = self.blocks[1](self.blocks[0](x))
        return self.head(x)


def nnx_net(dropout=0.0):
    model = NnxNet(nnx.Rngs(0), dropout)
    rng = np.random.default_rng(0)
    for layer in (model.bn, model.blocks[1]):
        layer.mean[...] = jnp.asarray(rng.standard_normal(4), jnp.float32)
        layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
        layer.bias[...] = jnp.asarray(rng.standard_normal(4), jnp.float32)
    return model


def state_paths(model):
    return {path for path, _ in nnx.to_flat_state(nnx.state(model))}


def nnx_loss(model):
    y = model(X)
    return jnp.sum(jnp.sin(y)), y


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_nnx_frozen_stays_frozen_after_train(stop_gradient):
    reference = nnx_net()
    reference.eval()
    (_, ref_y), ref_grads = nnx.value_and_grad(nnx_loss, has_aux=True)(reference)

    model = nnx_net()
    paths = state_paths(model)
    stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    assert freeze_batch_norms(model, stop_gradient=stop_gradient) is model
    assert isinstance(model.bn, FrozenBatchNorm) and isinstance(model.blocks[1], FrozenBatchNorm)
    assert state_paths(model) == paths  # checkpoints and masks still fit
    model.train()
    (_, y), grads = nnx.value_and_grad(nnx_loss, has_aux=True)(model)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.BatchStat)), jax.tree.leaves(stats), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    mask = nnx_batch_norm_mask(model)
    for is_bn, g, ref in zip(
        jax.tree.leaves(mask),
        jax.tree.leaves(nnx.as_pure(grads)),
        jax.tree.leaves(nnx.as_pure(ref_grads)),
        strict=True,
    ):
        if stop_gradient and is_bn:
            np.testing.assert_array_equal(g, 0.0)
        else:
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_nnx_unfreeze_restores_layers_options_and_mode():
    model = nnx_net()
    model.blocks[1].eval()
    freeze_batch_norms(model)
    model.train()  # does not reach the frozen layers
    unfreeze_batch_norms(model)
    assert type(model.bn) is nnx.BatchNorm and type(model.blocks[1]) is jbn.nnx.BatchNorm
    assert model.bn.momentum == 0.9 and model.bn.use_running_average is False
    assert model.blocks[1].use_running_average is True and model.blocks[1].use_scale is False
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    model(X)  # model.bn trains again
    assert not np.array_equal(
        nnx.state(model, nnx.BatchStat)["bn"]["mean"][...], before["bn"]["mean"][...]
    )


def test_nnx_freeze_errors():
    class MyBN(nnx.BatchNorm):
        pass

    with pytest.raises(TypeError, match=r"cannot freeze .*MyBN, a subclass of flax.nnx"):
        freeze_batch_norms(nnx.Sequential(MyBN(4, rngs=nnx.Rngs(0))))
    with pytest.raises(TypeError, match="stop_gradient must be a bool"):
        freeze_batch_norms(nnx_net(), stop_gradient=1)


def test_nnx_mask_and_one_optimizer_step():
    for frozen in (False, True):
        model = nnx_net()
        if frozen:
            freeze_batch_norms(model)
        mask = nnx_batch_norm_mask(model)
        flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
        assert {k for k, m in flat.items() if m} == {
            "['bn']['bias']",
            "['bn']['scale']",
            "['blocks'][1]['bias']",
        }
        is_bn = jax.tree.leaves(mask)
        adamw = optax.adamw(1e-2, weight_decay=0.1)
        for tx, expected in [
            (optimize_only(adamw, mask), is_bn),
            (optimize_only(adamw, jax.tree.map(lambda m: not m, mask)), [not m for m in is_bn]),
        ]:
            net = nnx.clone(model)
            optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
            before = nnx.clone(nnx.state(net, nnx.Param))
            grads = nnx.grad(lambda m: nnx_loss(m)[0])(net)
            optimizer.update(net, grads)
            assert _changed(before, nnx.state(net, nnx.Param)) == expected
