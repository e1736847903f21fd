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
