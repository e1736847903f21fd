"""jbn.nnx.use_accumulation and commit_batch_stats: accumulate, commit == one training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn


class Net(nnx.Module):
    """Two batch norms on branches of the input (each sees the same values either way)."""

    def __init__(self, bn_kwargs):
        self.conv = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
        self.bn_a = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(1))  # flax's, converted
        self.bn_b = jbn.nnx.BatchNorm(2, rngs=nnx.Rngs(2), **bn_kwargs)

    def __call__(self, x, mask=None):
        a = self.bn_a(self.conv(x))
        return a.mean((1, 2))[:, :2] + self.bn_b(x.mean((1, 2)), mask=mask)


@pytest.mark.parametrize(
    "bn_kwargs", [dict(momentum=None), dict(momentum=0.8, unbiased_running_var=True)]
)
def test_commit_is_one_training_step_on_the_whole_batch(bn_kwargs):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, (10, 4, 4, 2)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(10, 2)) > 0.3)
    model = Net(bn_kwargs)
    model = jbn.nnx.use_accumulation(model)
    assert isinstance(model.bn_a, jbn.nnx.BatchNorm)
    assert isinstance(model.bn_b.accum_m2, nnx.BatchStat)
    ref = nnx.clone(model)
    jbn.nnx.use_accumulation(ref, on=False)
    assert not hasattr(ref.bn_b, "accum_m2") and ref.bn_b.accumulation is None
    start = nnx.state(model, nnx.BatchStat)

    @nnx.jit
    def micro_step(model, x, mask):
        return model(x, mask)

    for part, m in zip(jnp.split(x, [2, 7]), jnp.split(mask, [2, 7]), strict=True):
        y = micro_step(model, part, m)
        want = nnx.clone(ref)(part, m)  # a training step (eager: last bits differ from jit)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    stats = nnx.state(model, nnx.BatchStat)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(start), strict=True):
        assert a.shape == b.shape
    np.testing.assert_array_equal(model.bn_b.mean[...], ref.bn_b.mean[...])  # not yet updated
    nnx.jit(jbn.nnx.commit_batch_stats)(model)
    ref(x, mask)  # one training step on the whole batch
    for name in ("bn_a", "bn_b"):
        got, want = getattr(model, name), getattr(ref, name)
        for k in ("mean", "var"):
            np.testing.assert_allclose(getattr(got, k)[...], getattr(want, k)[...], rtol=2e-6)
        if want.count is not None:
            np.testing.assert_array_equal(got.count[...], want.count[...])
        np.testing.assert_array_equal(got.accum_count[...], 0.0)
    # Evaluation calls run as usual and accumulate nothing.
    model.eval()
    y = model(x)
    np.testing.assert_array_equal(model.bn_b.accum_count[...], 0.0)
    ref.eval()
    np.testing.assert_allclose(y, ref(x), rtol=1e-5, atol=1e-6)


def test_empty_commit_and_bad_uses():
    model = jbn.nnx.use_accumulation(jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    jbn.nnx.commit_batch_stats(model)
    after = nnx.state(model, nnx.BatchStat)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no batch norm of the model is in the accumulation"):
        jbn.nnx.commit_batch_stats(jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="found no batch norm"):
        jbn.nnx.use_accumulation(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="virtual_batch_size=2"):
        jbn.nnx.use_accumulation(jbn.nnx.BatchNorm(3, virtual_batch_size=2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="on must be a Python bool"):
        jbn.nnx.use_accumulation(model, on="yes")  # pyright: ignore[reportArgumentType]
