"""The running update's guards (issue 19), against NumPy float64.

A feature whose batch statistics are not finite (NaN, +inf or -inf in the
batch) or that is fully masked keeps its running statistics and its count: the
cumulative average is the mean of the batches each feature counted, and the
debiased average (Equinox's) starts from a feature's first counted batch.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests.np_reference import np_stats

BAD = [np.nan, np.inf, -np.inf]


def batches(bad=None, at=1, feature=0, n=3, shape=(6, 3)):
    """``n`` batches of ``shape``; batch ``at`` holds ``bad`` in one value of ``feature``."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=shape) * (1 + i) + i for i in range(n)]
    if bad is not None:
        xs[at][2, feature] = bad
    return [x.astype(np.float32) for x in xs]


def cumulative_reference(xs, skipped):
    """Per-feature mean over the counted batches of their mean and biased variance (float64)."""
    stats = [np_stats(x, -1) for x in xs]
    means = np.stack([m.ravel() for m, _, _ in stats])
    variances = np.stack([v.ravel() for _, v, _ in stats])
    counted = np.ones(means.shape, bool)
    for batch, feature in skipped:
        counted[batch, feature] = False
    count = counted.sum(0)
    mean = np.where(counted, means, 0).sum(0) / count
    var = np.where(counted, variances, 0).sum(0) / count
    return mean, var, count


def debiased_reference(xs, skipped, m):
    """Equinox's debiased average over the batches each feature counted (float64)."""
    stats = [np_stats(x, -1) for x in xs]
    c = xs[0].shape[-1]
    out_mean, out_var = np.zeros(c), np.ones(c)
    for f in range(c):
        kept = [s for i, s in enumerate(stats) if (i, f) not in skipped]
        t = len(kept)
        w = m ** np.arange(t - 1, -1, -1) * (1 - m) / (1 - m**t)
        out_mean[f] = sum(wi * s[0].ravel()[f] for wi, s in zip(w, kept, strict=True))
        out_var[f] = sum(wi * s[1].ravel()[f] for wi, s in zip(w, kept, strict=True))
    return out_mean, out_var


@pytest.mark.parametrize("bad", BAD)
def test_cumulative_average_counts_per_feature(bad):
    params, state = jbn.bn_init(3, cumulative=True)
    xs = batches(bad)
    for x in xs:
        _, state = jbn.bn_forward(params, state, x, True, momentum=None)
    mean, var, count = cumulative_reference(xs, {(1, 0)})
    np.testing.assert_array_equal(state["count"], count)
    assert count.tolist() == [2, 3, 3]
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["var"], var, rtol=1e-5)


def test_cumulative_average_skips_a_fully_masked_feature():
    params, state = jbn.bn_init(3, cumulative=True)
    xs = batches()
    for i, x in enumerate(xs):
        mask = np.ones(x.shape, bool)
        if i == 1:
            mask[:, 2] = False
        _, state = jbn.bn_forward(params, state, x, True, momentum=None, mask=mask)
    mean, var, count = cumulative_reference(xs, {(1, 2)})
    np.testing.assert_array_equal(state["count"], [3, 3, 2])
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["var"], var, rtol=1e-5)


@pytest.mark.parametrize("bad", BAD)
def test_debiased_average_ignores_a_skipped_first_batch(bad):
    params, state = jbn.bn_init(3, cumulative=True)
    xs = batches(bad, at=0)
    for x in xs:
        _, state = jbn.bn_forward(params, state, x, True, momentum=0.9, debias=True)
    mean, var = debiased_reference(xs, {(0, 0)}, 0.9)
    np.testing.assert_array_equal(state["count"], [2, 3, 3])
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["var"], var, rtol=1e-5)


def test_a_scalar_count_from_an_older_checkpoint_is_broadcast():
    params, state = jbn.bn_init(3, cumulative=True)
    xs = batches()
    _, state = jbn.bn_forward(params, state, xs[0], True, momentum=None)
    old = {**state, "count": jnp.asarray(1, jnp.int32)}  # as saved before per-feature counts
    _, new = jbn.bn_forward(params, old, xs[1], True, momentum=None)
    mean, var, _ = cumulative_reference(xs[:2], set())
    np.testing.assert_array_equal(new["count"], [2, 2, 2])
    np.testing.assert_allclose(new["mean"], mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"state\['count'\] must be an integer array of the feature"
    ):
        jbn.bn_forward(params, {**state, "count": jnp.zeros(2, jnp.int32)}, xs[1], True,
                       momentum=None)  # fmt: skip


@pytest.mark.parametrize(
    "value, error, match",
    [
        (np.array([0.9, 0.9, 0.9]), ValueError, "momentum must be a scalar"),
        (2.0, ValueError, r"momentum must be >= 0\.0 and <= 1\.0, got 2\.0"),
        ("0.9", TypeError, "momentum must be a Python float"),
    ],
)
def test_momentum_errors_name_momentum(value, error, match):
    params, state = jbn.bn_init(3)
    with pytest.raises(error, match=match):
        jbn.bn_forward(params, state, jnp.ones((4, 3)), True, momentum=value)
