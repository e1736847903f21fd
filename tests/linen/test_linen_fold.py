"""jbn.fold_batch_norm_variables on flax.linen models: the folded variables are exactly
those of the same model without its batch norms and give its evaluation-mode outputs;
the check on a probe batch refuses a wrong fold; and the errors of both fold functions.

The reference is the unfolded linen model in evaluation mode.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables

import jbn


def _bn_vars(key, c):
    return random_variables(
        key, (c,), scale_std=0.5, bias_std=0.5, mean_std=2.0, var_range=(0.2, 3.0)
    )


class FoldCNN(nn.Module):
    """The demo CNN in miniature; ``fold=True`` is the same model with the batch norms folded away."""

    fold: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def norm(x, name):
            return x if self.fold else jbn.BatchNorm(use_running_average=not train, name=name)(x)

        for i, features in enumerate((4, 6)):
            x = nn.Conv(features, (3, 3), use_bias=self.fold, name=f"conv{i + 1}")(x)
            x = nn.max_pool(nn.relu(norm(x, f"bn{i + 1}")), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(norm(nn.Dense(8, name="dense1")(x), "bn3"))
        return nn.Dense(3, name="out")(x)


PAIRS = [("conv1", "bn1"), ("conv2", "bn2"), ("dense1", "bn3")]


@pytest.fixture(scope="module")
def cnn_input_and_variables():
    x = jax.random.normal(jax.random.key(6), (4, 8, 8, 2)) + 0.5
    return x, jax.jit(FoldCNN().init)(jax.random.key(7), x)


def test_folded_cnn_matches_eval_mode(cnn_input_and_variables):
    x, variables = cnn_input_and_variables
    for i, (_, bn) in enumerate(PAIRS):
        p, s = _bn_vars(jax.random.key(10 + i), variables["batch_stats"][bn]["mean"].shape[0])
        variables = {
            "params": {**variables["params"], bn: p},
            "batch_stats": {**variables["batch_stats"], bn: s},
        }
    folded = jbn.fold_batch_norm_variables(variables, PAIRS)
    # Exactly the variables of the fold=True model.
    expect = jax.eval_shape(FoldCNN(fold=True).init, jax.random.key(7), x)
    assert jax.tree.map(jnp.shape, folded) == jax.tree.map(jnp.shape, expect)
    y = jax.jit(FoldCNN().apply)(variables, x)
    y_fold = jax.jit(FoldCNN(fold=True).apply)(folded, x)
    np.testing.assert_allclose(y_fold, y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y))))
    assert "batch_stats" in variables and variables["params"]["bn1"]  # the input is left alone
    # The same, checked on the probe batch by fold itself.
    check = (FoldCNN().apply, FoldCNN(fold=True).apply, x)
    checked = jbn.fold_batch_norm_variables(variables, PAIRS, check=check)
    jax.tree.map(np.testing.assert_array_equal, checked, folded)


class ActivationBetween(nn.Module):
    """A batch norm after a ReLU: it cannot be folded into the Dense before the ReLU."""

    fold: bool = False
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, use_bias=self.fold, name="dense")(x)
        if self.fold:
            return nn.relu(x)
        return jbn.BatchNorm(use_running_average=True, epsilon=self.epsilon, name="bn")(nn.relu(x))


@pytest.mark.parametrize("case", ["epsilon", "activation"])
def test_fold_check_refuses_a_wrong_fold(case):
    x = jax.random.normal(jax.random.key(1), (16, 4))
    model = ActivationBetween(epsilon=0.1 if case == "epsilon" else 1e-5)
    if case == "epsilon":  # a plain Dense -> BN model folded with the default epsilon
        model, folded_model = FoldCNN(), FoldCNN(fold=True)
        x = jax.random.normal(jax.random.key(6), (4, 8, 8, 2)) + 0.5
        variables = jax.jit(FoldCNN().init)(jax.random.key(7), x)
        variables = {
            **variables,
            "batch_stats": jax.tree.map(lambda v: v * 0.0 + 1e-3, variables["batch_stats"]),
        }
        check = (model.apply, folded_model.apply, x)
        folded = jbn.fold_batch_norm_variables(variables, PAIRS, epsilon=1e-5, check=check)
        with pytest.raises(ValueError, match=r"differs from the original.*epsilon is not 0.1"):
            jbn.fold_batch_norm_variables(variables, PAIRS, epsilon=0.1, check=check)
        assert folded["params"]["conv1"]["bias"].shape == (4,)
        return
    variables = model.init(jax.random.key(0), x)
    p, s = _bn_vars(jax.random.key(2), 6)
    variables = {"params": {**variables["params"], "bn": p}, "batch_stats": {"bn": s}}
    check = (model.apply, ActivationBetween(fold=True).apply, x)
    with pytest.raises(
        ValueError, match="something sits between a pair's layer and its batch norm"
    ):
        jbn.fold_batch_norm_variables(variables, [("dense", "bn")], check=check)
    with pytest.raises(TypeError, match=r"check must be \(apply_fn, folded_apply_fn, x\)"):
        jbn.fold_batch_norm_variables(variables, [("dense", "bn")], check=(model.apply, x))


def test_fold_errors(cnn_input_and_variables):
    p, s = _bn_vars(jax.random.key(0), 3)
    with pytest.raises(
        ValueError, match=r"bn_state\['mean'\] has shape \(3,\), but the kernel of shape \(4, 5\)"
    ):
        jbn.fold_batch_norm(jnp.ones((4, 5)), None, p, s)
    with pytest.raises(ValueError, match=r"bias has shape \(2,\)"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), jnp.ones(2), p, s)
    with pytest.raises(ValueError, match="bn_state must be a dict"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, p, {"mean": s["mean"]})
    with pytest.raises(ValueError, match="unknown keys"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, {"gamma": p["scale"]}, s)
    with pytest.raises(ValueError, match=r"epsilon must be > 0\.0, got 0\.0"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, p, s, epsilon=0.0)
    v = cnn_input_and_variables[1]
    with pytest.raises(ValueError, match="no layer with a 'kernel' at 'conv9'"):
        jbn.fold_batch_norm_variables(v, [("conv9", "bn1")])
    with pytest.raises(ValueError, match="no batch norm .* at 'bn9'"):
        jbn.fold_batch_norm_variables(v, [("conv1", "bn9")])
    with pytest.raises(
        ValueError,
        match=r"bn_state\['mean'\] has shape \(6,\), but the kernel of shape \(3, 3, 2, 4\)",
    ):
        jbn.fold_batch_norm_variables(v, [("conv1", "bn2")])
    with pytest.raises(ValueError, match="already uses"):
        jbn.fold_batch_norm_variables(v, [("conv1", "bn1"), ("conv1", "bn1")])
    with pytest.raises(ValueError, match="pairs is empty"):
        jbn.fold_batch_norm_variables(v, [])
    with pytest.raises(ValueError, match=r"each pair must be \(layer_path, bn_path\)"):
        jbn.fold_batch_norm_variables(v, ["conv1"])
    with pytest.raises(ValueError, match="kernel must be a floating-point array"):
        jbn.fold_batch_norm(jnp.ones((4, 3), jnp.int32), None, p, s)
    with pytest.raises(TypeError, match="bn_params must be a dict"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, [p["scale"]], s)
    bad = {
        "params": {"conv1": {"kernel": jnp.ones((3, 3, 2, 3))}, "bn1": [1.0]},
        "batch_stats": {"bn1": s},
    }
    with pytest.raises(ValueError, match="'params' collection"):
        jbn.fold_batch_norm_variables({"batch_stats": {}}, [("conv1", "bn1")])
    with pytest.raises(ValueError, match="layer_path must be a module path"):
        jbn.fold_batch_norm_variables(bad, [("", "bn1")])
    with pytest.raises(ValueError, match="is not a batch norm's parameters"):
        jbn.fold_batch_norm_variables(bad, [("conv1", "bn1")])
