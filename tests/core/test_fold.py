"""jbn.fold_batch_norm on plain arrays: a layer's kernel and bias with its batch norm
folded in, against a NumPy float64 evaluation of layer then batch norm.

Folding the variables of a flax.linen model is tested in tests/linen/test_linen_fold.py.
"""

import jax
import numpy as np
import pytest
from helpers import random_variables

import jbn


def _bn_vars(key, c):
    return random_variables(
        key, (c,), scale_std=0.5, bias_std=0.5, mean_std=2.0, var_range=(0.2, 3.0)
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", ["both", "scale", "none"])
def test_fold_batch_norm_matches_numpy(with_bias, affine):
    k = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k[0], (7, 4))
    kernel = jax.random.normal(k[1], (4, 3))
    bias = jax.random.normal(k[2], (3,)) if with_bias else None
    bn_params, bn_state = _bn_vars(k[3], 3)
    bn_params = {"both": bn_params, "scale": {"scale": bn_params["scale"]}, "none": None}[affine]
    new_kernel, new_bias = jbn.fold_batch_norm(kernel, bias, bn_params, bn_state, epsilon=1e-3)
    assert new_kernel.dtype == kernel.dtype and new_bias.shape == (3,)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    z = f64(x) @ f64(kernel) + (0 if bias is None else f64(bias))
    bp = bn_params or {}
    y_np = (z - f64(bn_state["mean"])) / np.sqrt(f64(bn_state["var"]) + 1e-3) * f64(
        bp.get("scale", 1.0)
    ) + f64(bp.get("bias", 0.0))
    np.testing.assert_allclose(x @ new_kernel + new_bias[None], y_np, rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_output_first_kernel_matches_numpy():
    """An Equinox-style kernel (out, in, k), output features first (feature_axis=0)."""
    k = jax.random.split(jax.random.key(8), 4)
    x = np.asarray(jax.random.normal(k[0], (5, 4, 3)), np.float64)  # (batch, in, k)
    kernel = jax.random.normal(k[1], (6, 4, 3))
    bias = jax.random.normal(k[2], (6,))
    bn_params, bn_state = _bn_vars(k[3], 6)
    new_kernel, new_bias = jbn.fold_batch_norm(
        kernel, bias, bn_params, bn_state, epsilon=1e-3, feature_axis=0
    )
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    z = np.einsum("bik,oik->bo", x, f64(kernel)) + f64(bias)
    y_np = (z - f64(bn_state["mean"])) / np.sqrt(f64(bn_state["var"]) + 1e-3) * f64(
        bn_params["scale"]
    ) + f64(bn_params["bias"])
    y = np.einsum("bik,oik->bo", x, f64(new_kernel)) + f64(new_bias)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_axis must be an axis"):
        jbn.fold_batch_norm(kernel, bias, bn_params, bn_state, feature_axis=3)


def test_recorder_pairs_and_reasons():
    """The pairing rules on recorded objects: identity, single calls, one feature axis."""
    from jbn._fold_trace import NOT_AFTER_LAYER, Recorder

    a, b, c, d, e = (np.zeros((2, 3)) for _ in range(5))
    r = Recorder()
    r.layer("l1", a, -1)
    r.batch_norm("bn1", a, (1,))  # folds
    r.layer("l2", b, -1)
    r.batch_norm("bn2", b + 0, (1,))  # a new object: not the layer's output
    r.layer("l3", c, -1)
    r.batch_norm("bn3", c, (0,))  # the wrong axis
    r.layer("l4", d, -1, "not supported")
    r.batch_norm("bn4", d, (1,))
    r.batch_norm("bn5", a, (1,))  # called twice, and l1's output feeds two batch norms
    r.batch_norm("bn5", a, (1,))
    r.layer("l6", e, -1)
    r.batch_norm("bn6", e, (0, 1))
    f = np.zeros(2)
    r.layer("l8", f, 0)
    r.batch_norm("bn8", f, (0,))
    report, pairs = r.plan("tool")
    assert pairs == {"bn8": "l8"} and report.folded == (("l8", "bn8"),)
    assert "l1's output feeds 2 batch norms" in report.left["bn1"]
    assert report.left["bn2"] == NOT_AFTER_LAYER
    assert "axis 0 of its input, but l3's output features are on axis 1" in report.left["bn3"]
    assert "l4 cannot take it: not supported" in report.left["bn4"]
    assert "called 2 times" in report.left["bn5"]
    assert "several feature axes (0, 1)" in report.left["bn6"]
    empty = Recorder()
    with pytest.raises(ValueError, match="tool: the model ran no batch norm"):
        empty.plan("tool")
    empty.batch_norm("bn", a, (1,))
    with pytest.raises(ValueError, match="no batch norm of the model can be folded"):
        empty.plan("tool")
