"""jbn.equinox.BatchNorm: checks at construction and the running update's guards (issue 19)."""

import jax
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")
import jbn.equinox as je  # noqa: E402
from tests.core.test_running_guards import (  # noqa: E402
    BAD,
    batches,
    cumulative_reference,
    debiased_reference,
)
from tests.nnx.test_nnx_guards import BUILD_ERRORS  # noqa: E402

VMAP = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))


@pytest.mark.parametrize("kwargs, error, match", BUILD_ERRORS)
def test_refused_when_built(kwargs, error, match):
    kwargs = {("eps" if k == "epsilon" else k): v for k, v in kwargs.items()}
    match = match.replace("epsilon", "eps")
    with pytest.raises(error, match=match):
        je.BatchNorm(3, "batch", **kwargs)


def _train(bn, state, xs):
    step = jax.jit(jax.vmap(bn, **VMAP))
    for x in xs:
        _, state = step(x, state)
    return state.get(bn.state_index)


@pytest.mark.parametrize("bad", BAD)
def test_a_skipped_first_batch_leaves_no_placeholder(bad):
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(3, "batch", momentum=0.9)
    xs = batches(bad, at=0)
    run = _train(bn, state, xs)
    mean, var = debiased_reference(xs, {(0, 0)}, 0.9)
    assert int(run["count"]) == 3
    np.testing.assert_array_equal(run["feature_count"], [2, 3, 3])
    np.testing.assert_allclose(run["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["var"], var, rtol=1e-5)


@pytest.mark.parametrize("bad", BAD)
def test_cumulative_count_per_feature(bad):
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(3, "batch", momentum=None)
    xs = batches(bad)
    run = _train(bn, state, xs)
    mean, var, count = cumulative_reference(xs, {(1, 0)})
    np.testing.assert_array_equal(run["feature_count"], count)
    np.testing.assert_allclose(run["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["var"], var, rtol=1e-5)
