"""Frozen batch norm for fine-tuning and the optax masks on flax.linen models, on flax's and
jbn's layers alike (jbn.linen.frozen_batch_norms, batch_norm_mask; the NNX ones are in
tests/nnx/test_nnx_freeze.py).

The reference is flax's own evaluation mode.
"""

import functools

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import changed_leaves as _changed

import jbn
from jbn import optimize_only
from jbn.linen import batch_norm_mask, frozen_batch_norms, intercept

# Every leaf moved (kernels too), as these tests were written for.
perturbed = functools.partial(helpers.perturb_variables, std=0.3, every_leaf=True)

X = 1.0 + jax.random.normal(jax.random.key(0), (8, 3))


class LinenNet(nn.Module):
    """One ``train`` flag for dropout and batch norm, as most model code has it."""

    norm: type = nn.BatchNorm
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9)
        x = nn.Dense(4)(x)
        x = nn.relu(norm()(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(4, name="inner")(x)
        x = norm(use_scale=False, name="head_bn")(x)
        return nn.Dense(2)(x)


LINEN_MODELS = {
    "flax": (LinenNet(), None),
    "jbn": (LinenNet(norm=jbn.BatchNorm), None),
    "intercepted": (LinenNet(), intercept),
}


def _in(context, fn):
    if context is None:
        return fn()
    with context():
        return fn()


def loss_fn(model, variables, train, rngs=None):
    def loss(params):
        y, updates = model.apply(
            {**variables, "params": params}, X, train=train, mutable=["batch_stats"], rngs=rngs
        )
        return jnp.sum(jnp.sin(y)), (y, updates["batch_stats"])

    return jax.grad(loss, has_aux=True)(variables["params"])


@pytest.mark.parametrize("which", LINEN_MODELS)
@pytest.mark.parametrize("stop_gradient", [False, True])
def test_linen_frozen_is_evaluation_mode_without_updates(which, stop_gradient):
    model, context = LINEN_MODELS[which]
    variables = perturbed(model.init(jax.random.key(1), X, train=False))
    # reference: flax's own evaluation mode
    ref_grads, (ref_y, _) = loss_fn(LinenNet(), variables, train=False)

    def frozen():
        with frozen_batch_norms(stop_gradient=stop_gradient):
            return loss_fn(model, variables, train=True)

    grads, (y, stats) = _in(context, frozen)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing updated
    mask = batch_norm_mask(variables)
    for is_bn, g, ref in zip(
        jax.tree.leaves(mask), jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        if stop_gradient and is_bn:
            np.testing.assert_array_equal(g, 0.0)
        else:
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
            assert np.any(g != 0)


def test_linen_frozen_keeps_dropout_training_and_restores():
    model = LinenNet(dropout=0.5)
    variables = perturbed(model.init(jax.random.key(1), X, train=False))
    rngs = {"dropout": jax.random.key(2)}
    with frozen_batch_norms():
        _, (y_a, stats) = loss_fn(model, variables, train=True, rngs=rngs)
    _, (y_b, _) = loss_fn(model, variables, train=False)
    assert not np.allclose(y_a, y_b)  # dropout active: train mode reached it
    np.testing.assert_array_equal(
        stats["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"]
    )
    # after the context batch norm trains again
    _, (_, stats) = loss_fn(model, variables, train=True, rngs=rngs)
    assert not np.array_equal(
        stats["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"]
    )


def test_linen_frozen_subclass_with_own_call_raises():
    class Own(nn.BatchNorm):
        def __call__(self, x, use_running_average=None, *, mask=None):
            return x

    bn = Own(use_running_average=False)
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), X)
    with (
        frozen_batch_norms(),
        pytest.raises(TypeError, match=r"cannot freeze .*Own: its __call__ never calls"),
    ):
        bn.apply(variables, X, mutable=["batch_stats"])
    with pytest.raises(TypeError, match="stop_gradient must be a bool"):
        with frozen_batch_norms(stop_gradient="yes"):
            pass


# ---- linen masks ---------------------------------------------------------------


def test_batch_norm_mask_finds_exactly_the_batch_norm_params():
    for model in (LinenNet(), LinenNet(norm=jbn.BatchNorm)):
        variables = model.init(jax.random.key(1), X, train=False)
        mask = batch_norm_mask(variables)
        flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
        assert {k for k, m in flat.items() if m} == {
            "['BatchNorm_0']['bias']",
            "['BatchNorm_0']['scale']",
            "['head_bn']['bias']",
        }
        assert len(flat) == 9


def test_batch_norm_mask_errors():
    with pytest.raises(ValueError, match="has no 'batch_stats'"):
        batch_norm_mask({"params": {}})
    with pytest.raises(ValueError, match="linen variables dict"):
        batch_norm_mask([1, 2])


@pytest.mark.parametrize("norm", [nn.BatchNorm, jbn.BatchNorm], ids=["flax", "jbn"])
def test_linen_one_step_changes_exactly_the_intended_leaves(norm):
    model = LinenNet(norm=norm)
    variables = perturbed(model.init(jax.random.key(1), X, train=False))
    params = variables["params"]
    grads, _ = loss_fn(model, variables, train=True)
    mask = batch_norm_mask(variables)
    is_bn = jax.tree.leaves(mask)
    adamw = optax.adamw(1e-2, weight_decay=0.1)  # decay would move masked-out leaves
    recipes = {
        "train only batch norms": (optimize_only(adamw, mask), is_bn),
        "freeze batch norms": (
            optimize_only(adamw, jax.tree.map(lambda m: not m, mask)),
            [not m for m in is_bn],
        ),
        "optax.masked recipe": (
            optax.chain(adamw, optax.masked(optax.set_to_zero(), mask)),
            [not m for m in is_bn],
        ),
    }
    for name, (tx, expected) in recipes.items():
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        assert _changed(params, new) == expected, name
