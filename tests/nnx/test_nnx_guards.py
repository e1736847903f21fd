"""jbn.nnx.BatchNorm: checks at construction and the running update's guards (issue 19)."""

import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
import jbn.nnx  # noqa: E402
from tests.core.test_running_guards import BAD, batches, cumulative_reference  # noqa: E402

BUILD_ERRORS = [
    (dict(epsilon=float("inf")), ValueError, "epsilon must be a finite number > 0.0, got inf"),
    (dict(epsilon=-1.0), ValueError, r"epsilon must be > 0\.0, got -1\.0"),
    (dict(min_scale=float("inf")), ValueError, "min_scale must be a finite number > 0.0"),
    (dict(momentum=2.0), ValueError, r"momentum must be >= 0\.0 and <= 1\.0, got 2\.0"),
    (dict(momentum=np.array([0.9, 0.9, 0.9])), ValueError, "momentum must be a scalar"),
    (dict(unbiased_running_var="no"), TypeError, "unbiased_running_var must be a Python bool"),
    (dict(finite_running_stats=1), TypeError, "finite_running_stats must be a Python bool"),
    (dict(renorm="yes"), TypeError, "renorm must be a Python bool"),
    (dict(residual="x"), ValueError, "residual must be 'input' or 'output'"),
    (dict(virtual_batch_size=0), ValueError, "virtual_batch_size must be a positive int"),
    (dict(rmax=0.5), ValueError, r"rmax must be >= 1\.0"),
]


@pytest.mark.parametrize("kwargs, error, match", BUILD_ERRORS)
def test_refused_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)


def test_a_call_override_is_checked():
    bn = jbn.nnx.BatchNorm(3, renorm=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rmax must be >= 1\.0"):
        bn(np.ones((4, 3), np.float32), rmax=0.5)


@pytest.mark.parametrize("bad", BAD)
def test_cumulative_count_per_feature(bad):
    bn = jbn.nnx.BatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
    xs = batches(bad)
    for x in xs:
        bn(x)
    mean, var, count = cumulative_reference(xs, {(1, 0)})
    np.testing.assert_array_equal(bn.count[...], count)
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)
