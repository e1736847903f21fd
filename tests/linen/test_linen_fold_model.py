"""jbn.linen.fold_batch_norms: whole linen models folded with no model edit, against the
original model's own evaluation-mode outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn


class CNN(nn.Module):
    """A plain conv (no bias), a depthwise conv (bias), a dense layer, each with a batch norm."""

    residual: bool = False  # a conv whose output is also added after its batch norm

    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True, name="bn1")(
            nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        )
        y = nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(nn.relu(x))
        z = jbn.BatchNorm(use_running_average=True, name="bn2")(y)
        x = z + y if self.residual else z
        x = nn.ConvTranspose(3, (2, 2), transpose_kernel=True, use_bias=False, name="up")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn3")(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        x = jbn.BatchNorm(use_running_average=True, name="bn4")(nn.Dense(5, name="dense")(x))
        return nn.BatchNorm(use_running_average=True, name="after_add")(x + 1.0)


def _random_stats(variables, key):
    """Non-trivial running statistics and affine parameters on every batch norm."""
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for i, name in enumerate(sorted(stats)):
        k = jax.random.split(jax.random.fold_in(key, i), 4)
        c = stats[name]["mean"].shape
        stats[name] = {
            "mean": jax.random.normal(k[0], c),
            "var": jax.random.uniform(k[1], c, minval=0.2, maxval=3.0),
        }
        params[name] = {
            "scale": 1.0 + 0.5 * jax.random.normal(k[2], c),
            "bias": 0.5 * jax.random.normal(k[3], c),
        }
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def model_and_variables():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    variables = _random_stats(jax.jit(CNN().init)(jax.random.key(1), x), jax.random.key(2))
    return x, variables


def test_cnn_folds_to_its_evaluation_outputs(model_and_variables):
    x, variables = model_and_variables
    result = jbn.linen.fold_batch_norms(CNN().apply, variables, x)
    folded_apply, folded = result
    assert result.report.folded == (
        ("conv", "bn1"),
        ("depthwise", "bn2"),
        ("up", "bn3"),
        ("dense", "bn4"),
    )
    assert list(result.report.left) == ["after_add"]
    assert "not the output of a linear layer" in result.report.left["after_add"]
    # No folded batch norm is left; the layers without bias got one.
    assert set(folded["batch_stats"]) == {"after_add"}
    assert set(folded["params"]) == {"conv", "depthwise", "up", "dense", "after_add"}
    assert folded["params"]["conv"]["bias"].shape == (4,)
    # The original model's own outputs on new data (evaluation mode).
    x2 = jax.random.normal(jax.random.key(3), (3, 6, 6, 2))
    y_ref = np.asarray(CNN().apply(variables, x2))
    y = np.asarray(jax.jit(folded_apply)(folded, x2))
    np.testing.assert_allclose(y, y_ref, atol=1e-4 * np.abs(y_ref).max())
    # Exported, serialized, deserialized and run.
    exported = jax.export.export(jax.jit(folded_apply))(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), folded),
        jax.ShapeDtypeStruct(x2.shape, x2.dtype),
    )
    restored = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(restored.call(folded, x2), y, rtol=1e-6, atol=1e-6)


def test_intercepted_flax_model_folds(model_and_variables):
    """A flax model run through jbn (intercept()) folds like the one outside."""
    x, variables = model_and_variables

    def apply(v, x):
        with jbn.linen.intercept():
            return CNN().apply(v, x)

    folded_apply, folded = jbn.linen.fold_batch_norms(apply, variables, x)
    np.testing.assert_allclose(folded_apply(folded, x), CNN().apply(variables, x), atol=1e-4)


def test_mismatch_is_refused_with_the_difference(model_and_variables):
    """The depthwise conv's output also feeds the add after bn2: folding would change it."""
    x, variables = model_and_variables
    with pytest.raises(ValueError, match=r"differs from the original by \d.*rtol=0.0001"):
        jbn.linen.fold_batch_norms(CNN(residual=True).apply, variables, x)


def test_errors(model_and_variables):
    x, variables = model_and_variables
    dense = nn.Dense(3)
    v = dense.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="ran no batch norm"):
        jbn.linen.fold_batch_norms(dense.apply, v, x)
    with pytest.raises(ValueError, match="no batch norm of the model can be folded"):
        bn = nn.BatchNorm(use_running_average=True)
        jbn.linen.fold_batch_norms(bn.apply, bn.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match="'params' collection"):
        jbn.linen.fold_batch_norms(CNN().apply, {}, x)
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        jbn.linen.fold_batch_norms(None, variables, x)  # pyright: ignore[reportArgumentType]
