"""jbn.linen.BatchNorm: checks at setup and the running update's guards (issue 19).

One test also runs jbn.nnx.BatchNorm: both modules keep their running statistics on
non-finite batches, unless asked to update as flax does (finite_running_stats=False).
"""

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
from helpers import batch_and_variables as _data  # noqa: E402

import jbn  # noqa: E402
from tests.core.test_running_guards import BAD, batches, cumulative_reference  # noqa: E402
from tests.nnx.test_nnx_guards import BUILD_ERRORS  # noqa: E402


@pytest.mark.parametrize("kwargs, error, match", BUILD_ERRORS)
def test_refused_at_setup(kwargs, error, match):
    # Evaluation-mode init: before, bn_forward saw only some options there.
    bn = jbn.BatchNorm(use_running_average=True, **kwargs)
    with pytest.raises(error, match=match):
        bn.init(jax.random.key(0), np.ones((4, 3), np.float32))


def test_a_call_override_is_checked():
    bn = jbn.BatchNorm(use_running_average=False, renorm=True)
    x = np.ones((4, 3), np.float32)
    v = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"dmax must be >= 0\.0"):
        bn.apply(v, x, dmax=-1.0, mutable=["batch_stats"])


@pytest.mark.parametrize("bad", BAD)
def test_cumulative_count_per_feature(bad):
    bn = jbn.BatchNorm(use_running_average=False, momentum=None)
    xs = batches(bad)
    v = bn.init(jax.random.key(0), xs[0])
    for x in xs:
        _, upd = bn.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
    mean, var, count = cumulative_reference(xs, {(1, 0)})
    np.testing.assert_array_equal(v["batch_stats"]["count"], count)
    np.testing.assert_allclose(v["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["batch_stats"]["var"], var, rtol=1e-5)


def test_modules_keep_running_stats_on_nonfinite_batches():
    from flax import nnx

    x, _, _ = _data()
    x = x.at[2, 2].set(np.inf)
    bn = jbn.BatchNorm(momentum=0.9)
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    _, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert upd["batch_stats"]["var"][2] == 1.0 and upd["batch_stats"]["var"][0] != 1.0
    layer = jbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    layer(x)
    assert layer.var[...][2] == 1.0 and layer.var[...][0] != 1.0
    flaxlike = jbn.nnx.BatchNorm(3, momentum=0.9, finite_running_stats=False, rngs=nnx.Rngs(0))
    flaxlike(x)
    assert np.isnan(flaxlike.var[...][2])
