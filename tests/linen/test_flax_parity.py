"""flax 0.12.8's own batch-norm tests, run against flax's modules and jbn's.

Ported from flax's source distribution (``pip download --no-binary :all:
--no-deps flax==0.12.8``): ``tests/linen/linen_test.py`` (``test_batch_norm``,
``test_batch_norm_complex``, ``test_batch_norm_multi_init``) and
``tests/nnx/nn/normalization_test.py`` (``test_nnx_linen_batchnorm_equivalence`` and
``test_nnx_linen_spectralnorm_equivalence``, whose model holds a BatchNorm; its
float16 cases are marked slow).
Each runs unchanged in substance, parametrised over the implementation: flax's
module, ``jbn.BatchNorm`` / ``jbn.nnx.BatchNorm``, and flax's linen module under
``jbn.linen.intercept()``. On top of flax's own assertions, jbn's results are
compared with flax's exact-variance module.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from flax.typing import Dtype
from jax import random

import jbn
from jbn.linen import intercept

COMPLEX = pytest.mark.complex_inputs  # flax's complex-input cases (supported since the core change)

# name -> (linen BatchNorm class, nnx BatchNorm class, context to run in)
IMPLS = {
    "flax": (linen.BatchNorm, nnx.BatchNorm, contextlib.nullcontext),
    "jbn": (jbn.BatchNorm, jbn.nnx.BatchNorm, contextlib.nullcontext),
    "intercept": (linen.BatchNorm, jbn.nnx.BatchNorm, intercept),
}


# ---- tests/linen/linen_test.py -------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("test_mask", [True, False])
def test_batch_norm(impl, test_mask):
    batch_norm, _, context = IMPLS[impl]
    rng = random.key(0)
    key1, key2, key3 = random.split(rng, 3)
    x = random.normal(key1, (4, 3, 2))
    if test_mask:
        m = random.randint(key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32).astype(jnp.bool_)
        x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    else:
        m = None
    model_cls = batch_norm(momentum=0.9, use_running_average=False)
    with context():
        y, initial_params = model_cls.init_with_output(key3, x, mask=m)

    mean = y.mean((0, 1), where=m)
    var = y.var((0, 1), where=m)
    np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
    np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
    with context():
        _, vars_out = model_cls.apply(initial_params, x, mutable=["batch_stats"], mask=m)

    ema = vars_out["batch_stats"]
    np.testing.assert_allclose(
        ema["mean"], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4
    )
    np.testing.assert_allclose(
        ema["var"], 0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m), rtol=1e-4
    )


@pytest.mark.parametrize(
    "impl", ["flax", pytest.param("jbn", marks=COMPLEX), pytest.param("intercept", marks=COMPLEX)]
)
@pytest.mark.parametrize("test_mask", [True, False])
def test_batch_norm_complex(impl, test_mask):
    batch_norm, _, context = IMPLS[impl]
    rng = random.key(0)
    key1, key2, key3 = random.split(rng, 3)
    x = random.normal(key1, (4, 3, 2), dtype=jnp.complex64)
    if test_mask:
        m = random.randint(key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32).astype(jnp.bool_)
        x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    else:
        m = None
    model_cls = batch_norm(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    with context():
        y, initial_params = model_cls.init_with_output(key3, x, mask=m)

    mean = y.mean((0, 1), where=m)
    var = y.var((0, 1), where=m)
    np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
    np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
    assert mean.dtype == jnp.complex64

    with context():
        _, vars_out = model_cls.apply(initial_params, x, mutable=["batch_stats"], mask=m)

    ema = vars_out["batch_stats"]
    np.testing.assert_allclose(
        ema["mean"], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4
    )
    np.testing.assert_allclose(
        ema["var"], 0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m), rtol=1e-4
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_multi_init(impl):
    batch_norm, _, context = IMPLS[impl]

    class Foo(linen.Module):
        @linen.compact
        def __call__(self, x):
            norm = batch_norm(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    key = random.key(0)
    model = Foo()
    x = random.normal(random.key(1), (2, 4))
    with context():
        (y1, y2), _ = model.init_with_output(key, x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


# ---- tests/nnx/nn/normalization_test.py ------------------------------------------


def _equivalence(impl, dtype, param_dtype, use_fast_variance, mask):
    """flax's test body; returns what it compares, for the extra check against flax."""
    linen_batch_norm, nnx_batch_norm, context = IMPLS[impl]

    class NNXModel(nnx.Module):
        def __init__(self, dtype, param_dtype, use_fast_variance, rngs):
            self.norm_layer = nnx_batch_norm(
                5,
                use_running_average=False,
                dtype=dtype,
                param_dtype=param_dtype,
                use_fast_variance=use_fast_variance,
                promote_dtype=lambda x, **kwargs: x,  # ensure same behavior as Linen
                rngs=rngs,
            )
            self.linear = nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def __call__(self, x, *, mask=None):
            x = self.norm_layer(x, mask=mask)
            x = self.linear(x)
            return x

    class LinenModel(linen.Module):
        dtype: Dtype | None = None
        param_dtype: Dtype = jnp.float32
        use_fast_variance: bool = True

        def setup(self):
            self.norm_layer = linen_batch_norm(
                use_running_average=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                use_fast_variance=use_fast_variance,
            )
            self.linear = linen.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype)

        def __call__(self, x, *, mask=None):
            x = self.norm_layer(x, mask=mask)
            x = self.linear(x)
            return x

    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 5))

    linen_model = LinenModel(
        dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance
    )
    with context():
        variables: dict = linen_model.init(jax.random.key(1), x)
        linen_out, batch_stats = linen_model.apply(variables, x, mask=mask, mutable=["batch_stats"])

    nnx_model = NNXModel(
        dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance, rngs=rngs
    )
    nnx_model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    nnx_model.linear.bias[...] = variables["params"]["linear"]["bias"]

    with context():
        linen_out, updates = linen_model.apply(variables, x, mask=mask, mutable=["batch_stats"])
    variables.update(updates)
    nnx_out = nnx_model(x, mask=mask)
    np.testing.assert_array_equal(linen_out, nnx_out)
    # Compare BatchNorm parameters
    np.testing.assert_array_equal(
        variables["params"]["norm_layer"]["scale"], nnx_model.norm_layer.scale[...]
    )
    np.testing.assert_array_equal(
        variables["params"]["norm_layer"]["bias"], nnx_model.norm_layer.bias[...]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["norm_layer"]["mean"], nnx_model.norm_layer.mean[...]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["norm_layer"]["var"], nnx_model.norm_layer.var[...]
    )
    return linen_out, variables


EQUIVALENCE = dict(
    dtype=[jnp.float32, jnp.float16],
    param_dtype=[jnp.float32, jnp.float16],
    use_fast_variance=[True, False],
    mask=[None, np.array([True, False, True, False, True])],
)


@functools.cache
def _flax_exact(dtype, param_dtype, mask_key):
    """flax's exact-variance result for the same case, the reference for jbn."""
    mask = None if mask_key is None else np.array(mask_key)
    return _equivalence("flax", dtype, param_dtype, False, mask)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", EQUIVALENCE["mask"], ids=["no_mask", "mask"])
@pytest.mark.parametrize("use_fast_variance", EQUIVALENCE["use_fast_variance"])
@pytest.mark.parametrize("param_dtype", EQUIVALENCE["param_dtype"], ids=["p32", "p16"])
@pytest.mark.parametrize("dtype", EQUIVALENCE["dtype"], ids=["f32", "f16"])
def test_nnx_linen_batchnorm_equivalence(impl, dtype, param_dtype, use_fast_variance, mask):
    out, variables = _equivalence(impl, dtype, param_dtype, use_fast_variance, mask)
    if impl == "flax":
        return
    # jbn against flax's exact statistics (flax's fast variance differs from both)
    ref_out, ref_variables = _flax_exact(
        dtype, param_dtype, None if mask is None else tuple(mask.tolist())
    )
    low = jnp.float16 in (dtype, param_dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if low else dict(rtol=1e-5, atol=1e-6)
    assert out.dtype == ref_out.dtype
    if mask is None:
        np.testing.assert_allclose(
            np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **tol
        )
    else:
        # The mask hides features 1 and 3 entirely: flax's statistics (and with
        # them every output, through the Dense layer) are NaN; jbn keeps the
        # running statistics of such a feature, so everything stays finite.
        assert np.isnan(np.asarray(ref_out, np.float32)).all()
        assert np.isfinite(np.asarray(out, np.float32)).all()
    seen = np.ones(5, bool) if mask is None else mask
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ref_variables), strict=True):
        assert a.dtype == b.dtype
        if a.shape == (5,):
            a, b = a[seen], b[seen]
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("update_stats", [True, False])
@pytest.mark.parametrize("n_steps", [1, 10])
@pytest.mark.parametrize(
    "param_dtype",
    [jnp.float32, pytest.param(jnp.float16, marks=pytest.mark.slow)],
    ids=["p32", "p16"],
)
@pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.float16, marks=pytest.mark.slow)], ids=["f32", "f16"]
)
def test_nnx_linen_spectralnorm_equivalence(impl, dtype, param_dtype, n_steps, update_stats):
    """flax's spectral-norm test, whose wrapped Sequential holds a BatchNorm."""
    linen_batch_norm, nnx_batch_norm, context = IMPLS[impl]

    class NNXModel(nnx.Module):
        def __init__(self, dtype, param_dtype, rngs):
            self.seq = nnx.Sequential(
                nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                nnx.relu,
                nnx_batch_norm(
                    4,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                    use_running_average=not update_stats,
                ),
            )
            self.norm_layer = nnx.SpectralNorm(
                self.seq,
                n_steps=n_steps,
                dtype=dtype,
                param_dtype=param_dtype,
                update_stats=update_stats,
                rngs=rngs,
            )

        def __call__(self, x):
            return self.norm_layer(x)

    class LinenModel(linen.Module):
        dtype: Dtype | None = None
        param_dtype: Dtype = jnp.float32

        def setup(self):
            self.seq = linen.Sequential(
                [
                    linen.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype),
                    linen.relu,
                    linen_batch_norm(
                        dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        use_running_average=not update_stats,
                    ),
                ]
            )
            self.norm_layer = linen.SpectralNorm(self.seq, n_steps=n_steps)

        def __call__(self, x):
            return self.norm_layer(x, update_stats=update_stats)

    rngs = nnx.Rngs(42)
    x = jax.random.normal(jax.random.key(0), (10, 5))

    linen_model = LinenModel(dtype=dtype, param_dtype=param_dtype)
    with context():
        variables = linen_model.init(jax.random.key(1), x)

    nnx_model = NNXModel(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Setup the same weights and batch stats
    var_params_seq_0 = variables["params"]["seq"]["layers_0"]
    nnx_model.seq.layers[0].kernel.set_value(var_params_seq_0["kernel"])
    nnx_model.seq.layers[0].bias.set_value(var_params_seq_0["bias"])

    var_params_seq_2 = variables["params"]["seq"]["layers_2"]
    nnx_model.seq.layers[2].scale.set_value(var_params_seq_2["scale"])
    nnx_model.seq.layers[2].bias.set_value(var_params_seq_0["bias"])

    var_norm_layer = variables["batch_stats"]["norm_layer"]
    nnx_model.norm_layer.batch_stats[("layers", 0, "kernel", "u")].set_value(
        var_norm_layer["seq/layers_0/kernel/u"]
    )
    nnx_model.norm_layer.batch_stats[("layers", 0, "kernel", "sigma")].set_value(
        var_norm_layer["seq/layers_0/kernel/sigma"]
    )

    with context():
        linen_out = linen_model.apply(variables, x, mutable=["batch_stats"])
    nnx_out = nnx_model(x)
    np.testing.assert_array_equal(linen_out[0], nnx_out)

    np.testing.assert_array_equal(
        nnx_model.norm_layer.batch_stats[("layers", 0, "kernel", "u")],
        linen_out[1]["batch_stats"]["norm_layer"]["seq/layers_0/kernel/u"],
    )
    np.testing.assert_array_equal(
        nnx_model.norm_layer.batch_stats[("layers", 0, "kernel", "sigma")],
        linen_out[1]["batch_stats"]["norm_layer"]["seq/layers_0/kernel/sigma"],
    )
