"""The accumulation mode of ``bn_forward`` (``train=jbn.Accumulate()``) and ``bn_commit``.

Reference: float64 NumPy statistics of the concatenated batch (tests/np_reference.py)
and each running-update convention written out here: flax's EMA, torch's
cumulative average and unbiased variance, Equinox's debiased average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn
from tests.np_reference import np_stats

C = 3
# Each running-update convention: bn_forward/bn_commit keywords.
CONVENTIONS = {
    "ema": dict(momentum=0.9),
    "cumulative": dict(momentum=None),
    "unbiased": dict(momentum=0.8, unbiased_running_var=True),
    "debias": dict(momentum=0.9, debias=True),
}


def np_step(state, x, mask, momentum, unbiased_running_var=False, debias=False):
    """One training step's running statistics from the (concatenated) batch, float64.

    A feature without values, or with non-finite statistics, keeps its statistics
    and its count.
    """
    mean_b, var_b, n = (v.reshape(-1) for v in np_stats(x, -1, mask))
    if unbiased_running_var:
        var_b = var_b * n / np.maximum(n - 1, 1)
    old_mean, old_var = (np.asarray(state[k], np.float64) for k in ("mean", "var"))
    update = (n > 0) & np.isfinite(mean_b) & np.isfinite(var_b)
    counted = momentum is None or debias  # an EMA keeps no count
    count = np.asarray(state["count"]) + (update if counted else 0)
    t = np.maximum(count, 1).astype(np.float64)
    if momentum is None:
        decay = 1 - 1 / t
    elif debias:
        decay = (momentum - momentum**t) / (1 - momentum**t)
    else:
        decay = np.full(C, momentum)
    with np.errstate(invalid="ignore"):
        mean = np.where(update, decay * old_mean + (1 - decay) * mean_b, old_mean)
        var = np.where(update, decay * old_var + (1 - decay) * var_b, old_var)
    return mean, var, count


def start(rng, dtype=jnp.float64):
    """Parameters and a state with history: random statistics, 3 batches counted."""
    params = {"scale": jnp.asarray(rng.uniform(0.5, 2, C), dtype), "bias": jnp.ones(C, dtype)}
    state = {
        "mean": jnp.asarray(rng.normal(size=C), dtype),
        "var": jnp.asarray(rng.uniform(0.5, 2, C), dtype),
        "count": jnp.full(C, 3, jnp.int32),
    }
    return params, state


def micro_batches(rng, shape_tail, sizes=(2, 5, 2, 4)):
    """Unequal micro-batches and masks (one micro-batch's feature 2 fully masked)."""
    xs = [rng.normal(3.0 + i, 1.0 + i, (b, *shape_tail)) for i, b in enumerate(sizes)]
    masks = [rng.uniform(size=x.shape) > 0.25 for x in xs]
    masks[1][..., 2] = False
    masks[2][...] = True  # one micro-batch unmasked
    return xs, masks


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("tail", [(C,), (2, 3, C)], ids=["dense", "nhwc"])
def test_commit_is_one_step_on_the_concatenated_batch(convention, tail):
    kwargs = CONVENTIONS[convention]
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params, state = start(rng)
        xs, masks = micro_batches(rng, tail)
        s = state
        for x, mask in zip(xs, masks, strict=True):
            y, s = jbn.bn_forward(params, s, x, jbn.Accumulate(), mask=mask, **kwargs)
            y_train, _ = jbn.bn_forward(params, state, x, True, mask=mask, **kwargs)
            np.testing.assert_array_equal(y, y_train)  # normalized as in training
            for k in state:  # the running statistics are left alone
                np.testing.assert_array_equal(s[k], state[k])
        committed = jbn.bn_commit(s, **kwargs)
        x_all, m_all = np.concatenate(xs), np.concatenate(masks)
        ref_mean, ref_var, ref_count = np_step(state, x_all, m_all, **kwargs)
        np.testing.assert_allclose(committed["mean"], ref_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(committed["var"], ref_var, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(committed["count"], ref_count)
        # ... and one bn_forward training step on the concatenated batch.
        _, full = jbn.bn_forward(params, state, x_all, True, mask=m_all, **kwargs)
        for k in ("mean", "var"):
            np.testing.assert_allclose(committed[k], full[k], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(committed["count"], full["count"])
        # The accumulator is kept, empty.
        for k in ("accum_count", "accum_mean", "accum_m2"):
            np.testing.assert_array_equal(committed[k], np.zeros_like(s[k]))


@pytest.mark.parametrize("finite_running_stats", [True, False])
def test_a_non_finite_micro_batch(finite_running_stats):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        params, state = start(rng)
        xs, _ = micro_batches(rng, (C,))
        xs[1][0, 1] = np.nan
        xs[2][0, 0] = np.inf
        kw = dict(momentum=None, finite_running_stats=finite_running_stats)
        s = jbn.start_accumulation(state)
        for x in xs:
            _, s = jbn.bn_forward(params, s, x, jbn.Accumulate(), **kw)
        committed = jbn.bn_commit(s, **kw)
        ref_mean, ref_var, ref_count = np_step(state, np.concatenate(xs), None, None)
        if finite_running_stats:  # features 0 and 1 keep theirs, feature 2 is exact
            np.testing.assert_allclose(committed["mean"], ref_mean, rtol=1e-12)
            np.testing.assert_allclose(committed["var"], ref_var, rtol=1e-12)
            np.testing.assert_array_equal(committed["count"], ref_count)
            np.testing.assert_array_equal(committed["mean"][:2], state["mean"][:2])
        else:  # as the step on the concatenated batch: non-finite
            _, full = jbn.bn_forward(params, state, np.concatenate(xs), True, **kw)
            for k in ("mean", "var"):
                assert not np.isfinite(np.asarray(committed[k])[:2]).all()
                assert np.isfinite(np.asarray(committed[k])[2])
                assert np.isfinite(np.asarray(full[k])[:2]).all() == (
                    np.isfinite(np.asarray(committed[k])[:2]).all()
                )
            np.testing.assert_allclose(committed["var"][2], full["var"][2], rtol=1e-12)
            np.testing.assert_array_equal(committed["count"], full["count"])


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_a_commit_with_nothing_accumulated_changes_nothing(convention):
    kwargs = CONVENTIONS[convention]
    rng = np.random.default_rng(2)
    params, state = start(rng, jnp.float32)
    s = jbn.start_accumulation(state)
    assert jbn.start_accumulation(s).keys() == s.keys()
    for k in ("accum_count", "accum_m2", "accum_mean"):
        assert s[k].dtype == jnp.float32 and s[k].shape == (C,)
    committed = jbn.bn_commit(s, **kwargs)
    assert committed.keys() == s.keys()
    for k in s:
        np.testing.assert_array_equal(committed[k], s[k])
        assert committed[k].dtype == s[k].dtype
    # Fully masked micro-batches accumulate nothing either.
    x = jnp.asarray(rng.normal(size=(4, C)), jnp.float32)
    _, s = jbn.bn_forward(params, s, x, jbn.Accumulate(), mask=jnp.zeros((4, C), bool))
    for k in state:
        np.testing.assert_array_equal(jbn.bn_commit(s, **kwargs)[k], state[k])


def test_other_modes_carry_the_accumulator_and_commit_keeps_a_stream_memory():
    rng = np.random.default_rng(3)
    params, state = start(rng, jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, C)), jnp.float32)
    _, s = jbn.bn_forward(params, state, x, jbn.Accumulate())
    for mode in (True, False, jbn.Prior(4.0), jbn.Stream(8.0, 2.0)):
        _, out = jbn.bn_forward(params, s, x, mode, momentum=0.9)
        for k in ("accum_count", "accum_mean", "accum_m2"):
            np.testing.assert_array_equal(out[k], s[k])
    _, s = jbn.bn_forward(params, s, x, jbn.Stream(8.0, 2.0))
    committed = jbn.bn_commit(s)
    for k in ("stream_mean", "stream_var", "stream_count"):
        np.testing.assert_array_equal(committed[k], s[k])


def test_four_devices_commit_the_statistics_of_all_micro_batches(four_devices):
    """k = 3 micro-batches on each of P = 4 devices: the commit sees all 12, masks included."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        params, state = start(rng)
        mesh = Mesh(np.array(four_devices), ("data",))
        xs = [rng.normal(1.0 + i, 2.0, (8, C)) for i in range(3)]  # 2 examples per device
        masks = [rng.uniform(size=(8, C)) > 0.3 for _ in range(3)]

        def per_device(s, x, mask):
            return jbn.bn_forward(params, s, x, jbn.Accumulate(), mask=mask, axis_name="data")

        run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                    out_specs=(P("data"), P())))  # fmt: skip
        s = jbn.start_accumulation(state)
        for x, mask in zip(xs, masks, strict=True):
            _, s = run(s, x, mask)
        committed = jbn.bn_commit(s, momentum=0.9, unbiased_running_var=True)
        ref = np_step(state, np.concatenate(xs), np.concatenate(masks), 0.9, True)
        np.testing.assert_allclose(committed["mean"], ref[0], rtol=1e-12)
        np.testing.assert_allclose(committed["var"], ref[1], rtol=1e-12)
        # vmap with an axis name is the same sync.
        vrun = jax.vmap(per_device, in_axes=(None, 0, 0), out_axes=(0, None), axis_name="data")
        s = jbn.start_accumulation(state)
        for x, mask in zip(xs, masks, strict=True):
            _, s = vrun(s, x.reshape(4, 2, C), mask.reshape(4, 2, C))
        committed = jbn.bn_commit(s, momentum=0.9, unbiased_running_var=True)
        np.testing.assert_allclose(committed["var"], ref[1], rtol=1e-12)


def test_scan_gradient_is_ghost_batch_norms_and_commit_is_one_step():
    """Under jit + lax.scan, the summed gradient over micro-batches of 4 is ghost batch norm's
    with virtual batches of 4, and the commit is one training step on the whole batch."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        params, state = start(rng)
        x = jnp.asarray(rng.normal(2.0, 3.0, (16, 2, C)))
        w = jnp.asarray(rng.normal(size=(16, 2, C)))
        k, micro = 4, 4

        def micro_loss(p, s, xm, wm):
            y, s = jbn.bn_forward(p, s, xm, jbn.Accumulate(), momentum=None)
            return jnp.sum(jnp.tanh(y) * wm), s

        @jax.jit
        def accumulated(p, s, x, w):
            def body(carry, batch):
                grads, s = carry
                g, s = jax.grad(micro_loss, has_aux=True)(p, s, *batch)
                return (jax.tree.map(jnp.add, grads, g), s), None

            zeros = jax.tree.map(jnp.zeros_like, p)
            batches = (x.reshape(k, micro, 2, C), w.reshape(k, micro, 2, C))
            (grads, s), _ = jax.lax.scan(body, (zeros, jbn.start_accumulation(s)), batches)
            return grads, jbn.bn_commit(s, momentum=None)

        def ghost_loss(p, x):
            y, _ = jbn.bn_forward(p, state, x, True, momentum=None, virtual_batch_size=micro)
            return jnp.sum(jnp.tanh(y) * w)

        grads, committed = accumulated(params, state, x, w)
        ghost = jax.grad(ghost_loss)(params, x)
        for name in ("scale", "bias"):
            np.testing.assert_allclose(grads[name], ghost[name], rtol=1e-12, atol=1e-12)
        # The input gradient too.
        gx = jax.jit(jax.grad(lambda xx: sum(
            micro_loss(params, state, xm, wm)[0]
            for xm, wm in zip(jnp.split(xx, k), jnp.split(w, k), strict=True)
        )))(x)  # fmt: skip
        gx_ghost = jax.jit(jax.grad(ghost_loss, 1))(params, x)
        np.testing.assert_allclose(gx, gx_ghost, rtol=1e-11, atol=1e-12)
        ref = np_step(state, np.asarray(x), None, None)
        np.testing.assert_allclose(committed["mean"], ref[0], rtol=1e-12)
        np.testing.assert_allclose(committed["var"], ref[1], rtol=1e-12)
        np.testing.assert_array_equal(committed["count"], ref[2])


def test_bad_inputs():
    params, state = jbn.bn_init(C)
    x = jnp.ones((4, C)) * jnp.arange(4.0)[:, None]
    with pytest.raises(ValueError, match="state has no accumulator"):
        jbn.bn_commit(state)
    acc = jbn.start_accumulation(state)
    partial = {k: v for k, v in acc.items() if k != "accum_m2"}
    with pytest.raises(ValueError, match=r"partial accumulator, missing \['accum_m2'\]"):
        jbn.bn_commit(partial)
    with pytest.raises(ValueError, match=r"partial accumulator, missing \['accum_m2'\]"):
        jbn.bn_forward(params, partial, x, jbn.Accumulate())
    with pytest.raises(ValueError, match=r"state\['accum_count'\] must have the feature shape"):
        jbn.bn_commit({**acc, "accum_count": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"pass an instance, e.g. train=jbn.Accumulate\(\)"):
        jbn.bn_forward(params, state, x, jbn.Accumulate)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="already is a mode"):
        jbn.bn_forward(params, state, x, jbn.Accumulate(), prior=4.0)
    with pytest.raises(ValueError, match="virtual_batch_size and renorm are for train=True"):
        jbn.bn_forward(params, state, x, jbn.Accumulate(), virtual_batch_size=2)
    with pytest.raises(ValueError, match="virtual_batch_size and renorm are for train=True"):
        jbn.bn_forward(params, state, x, jbn.Accumulate(), renorm=True)
    with pytest.raises(ValueError, match="need state\\['count'\\]"):
        jbn.bn_commit(acc, momentum=None)
    with pytest.raises(TypeError, match="state must be a dict"):
        jbn.bn_commit([1.0])  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="momentum"):
        jbn.bn_commit(acc, momentum=1.5)
    with pytest.raises(TypeError, match="debias"):
        jbn.bn_commit(acc, debias="yes")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="missing 'mean'"):
        jbn.start_accumulation({"var": jnp.ones(C)})
