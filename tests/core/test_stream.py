"""The stream mode of ``bn_forward`` (``train=jbn.Stream(horizon, prior)``) and the mode values.

Reference: a float64 NumPy transcription that keeps the memory as (count, mean,
M2), combines it with each batch by Chan's formula and caps the count at the
horizon by scaling count and M2 alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jbn
from tests.np_reference import np_stream, np_verdicts

C = 5
EPS = 1e-5


def setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {"scale": rng.normal(1, 0.3, C), "bias": rng.normal(0, 0.3, C)}
    state = {"mean": rng.normal(0, 1, C), "var": rng.uniform(0.5, 2, C)}
    params, state = (
        {k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for d in (params, state)
    )
    return rng, params, state


@jax.jit(static_argnames="mode")
def step(params, state, x, mask, mode):
    return jbn.bn_forward(params, state, x, mode, mask=mask)


def assert_memory(state, memory, rtol=2e-5):
    count, mean, var = memory
    np.testing.assert_allclose(state["stream_count"], count, rtol=1e-6)
    np.testing.assert_allclose(state["stream_mean"], mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(state["stream_var"], var, rtol=rtol, atol=rtol)


def check_stream_steps(params, state, mode, xs, masks, ys_ref, mem_ref):
    """Runs the stream batch by batch against the reference; returns the last state."""
    s = state
    for x, mask, y_ref, memory in zip(xs, masks, ys_ref, mem_ref, strict=True):
        y, s = step(params, s, x, mask, mode)
        counted = np.ones(y.shape, bool) if mask is None else np.broadcast_to(mask, y.shape)
        np.testing.assert_allclose(np.asarray(y)[counted], y_ref[counted], rtol=3e-5, atol=3e-5)
        assert_memory(s, memory)
        for k in ("mean", "var"):  # the training statistics are left alone
            np.testing.assert_array_equal(s[k], state[k])
    return s


def test_memory_matches_numpy_with_unequal_batches_and_masks():
    rng, params, state = setup()
    mode = jbn.Stream(horizon=12.0, prior=4.0, surprise=None)  # the plain memory
    # Batches of 8, 1, 6 and 3 examples (masks), then 8 with single values masked out.
    counts = (8, 1, 6, 3)
    xs = [rng.normal(2.0 + i, 1.0 + i, (8, C)).astype(np.float32) for i in range(5)]
    masks = [np.arange(8)[:, None] < c for c in counts]
    masks.append(rng.uniform(size=(8, C)) > 0.3)
    ys_ref, mem_ref = np_stream(xs, masks, params["scale"], params["bias"],
                                state["mean"], state["var"], 12.0, 4.0, None)  # fmt: skip
    s = check_stream_steps(params, state, mode, xs, masks, ys_ref, mem_ref)
    assert float(s["stream_count"][0]) == 12.0  # capped at the horizon


def test_surprise_cuts_the_memory_as_numpy_does():
    rng, params, state = setup(8)
    mode = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.5)
    # A shifted stream: far from the running statistics, then back to them; masks.
    locs = (4.0, 4.0, 0.0, 0.0, 4.0)
    xs = [rng.normal(loc, 1.0 + loc, (8, C)).astype(np.float32) for loc in locs]
    masks = [np.arange(8)[:, None] < c for c in (8, 2, 8, 5)]
    masks.append(rng.uniform(size=(8, C)) > 0.3)
    ys_ref, mem_ref = np_stream(xs, masks, params["scale"], params["bias"], state["mean"],
                                state["var"], 40.0, 4.0, surprise=0.5)  # fmt: skip
    check_stream_steps(params, state, mode, xs, masks, ys_ref, mem_ref)
    counts = [float(m[0][0]) for m in mem_ref]
    assert counts[0] < 12.0  # the shift cut the memory from 40 examples
    assert counts[2] > counts[1]  # the memory grows back on data it describes
    # Without the surprise, the same stream keeps the memory at the horizon.
    _, plain = np_stream(xs, masks, params["scale"], params["bias"], state["mean"],
                         state["var"], 40.0, 4.0, None)  # fmt: skip
    assert float(plain[0][0][0]) == 40.0


@pytest.mark.parametrize("shape", [(8, C), (4, 3, 3, C)], ids=["dense", "nhwc"])
def test_anchor_brings_the_training_statistics_back_as_numpy_does(shape):
    """A shift, then data like the training data: the memory restarts from the training statistics.

    NHWC input gives each example 9 values per feature, so the surprise and
    the scores must average an example's values (a sum would cut and anchor
    differently from the reference).
    """
    rng, params, state = setup(11)
    mode = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.6, anchor=1.0)
    sd = np.sqrt(np.asarray(state["var"]))
    shifted = [rng.normal(4.0, 3.0, shape) for _ in range(3)]
    clean = [np.asarray(state["mean"]) + sd * rng.normal(size=shape) for _ in range(2)]
    xs = [x.astype(np.float32) for x in shifted + clean]
    masks = [None, None, np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)) < 3,
             None, rng.uniform(size=shape) > 0.2]  # fmt: skip
    args = (params["scale"], params["bias"], state["mean"], state["var"], 40.0, 4.0, 0.6)
    ys_ref, mem_ref = np_stream(xs, masks, *args, anchor=1.0)
    check_stream_steps(params, state, mode, xs, masks, ys_ref, mem_ref)
    # The return re-seeded the memory: its mean is near the training mean again,
    # where without the anchor it is still near the shifted data's.
    _, stale = np_stream(xs, masks, *args, anchor=None)
    train_mean = np.asarray(state["mean"])
    assert np.max(np.abs(mem_ref[3][1] - train_mean)) < 0.5
    assert np.min(np.abs(stale[3][1] - train_mean)) > 1.0
    # And the surprise cut on this input, without the anchor, matches too.
    stale_mode = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.6, anchor=None)
    ys_stale, _ = np_stream(xs, masks, *args, anchor=None)
    check_stream_steps(params, state, stale_mode, xs, masks, ys_stale, stale)


def test_anchor_keeps_a_memory_that_describes_the_stream():
    """On a shifted stream the memory has learned, the anchor never fires."""
    rng, params, state = setup(12)
    mode = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.6, anchor=1.0)
    xs = [rng.normal(4.0, 3.0, (4, 3, 3, C)).astype(np.float32) for _ in range(6)]
    args = (params["scale"], params["bias"], state["mean"], state["var"], 40.0, 4.0, 0.6)
    _, with_anchor = np_stream(xs, [None] * 6, *args, anchor=1.0)
    ys_ref, without = np_stream(xs, [None] * 6, *args, anchor=None)
    for a, b in zip(with_anchor, without, strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
    check_stream_steps(params, state, mode, xs, [None] * 6, ys_ref, without)


@pytest.mark.parametrize("shape", [(6, C), (6, 3, 3, C)], ids=["dense", "nhwc"])
def test_a_young_memory_normalizes_each_example_on_its_own_as_numpy_does(shape):
    rng, params, state = setup(11)
    mode = jbn.Stream(horizon=50.0, prior=8.0, surprise=0.5, anchor=None)  # settle 0.1
    # Far from the training statistics, the cut leaves fewer than 5 examples in the
    # memory; masks count some of an example's values, none of example 0's.
    xs = [rng.normal(loc, 2.0, shape).astype(np.float32) for loc in (5.0, 5.0, 0.0)]
    masks = [rng.uniform(size=shape[:-1] + (1,)) > 0.3 for _ in xs]
    masks[0][0] = False
    masks[0][1] = True
    args = (params["scale"], params["bias"], state["mean"], state["var"], 50.0, 8.0, 0.5)
    ys_ref, mem_ref = np_stream(xs, masks, *args, anchor=None)
    check_stream_steps(params, state, mode, xs, masks, ys_ref, mem_ref)
    ys_plain, _ = np_stream(xs, masks, *args, anchor=None, settle=None)
    takes_path = len(shape) > 2  # one value per feature: the memory alone, young or not
    assert (np.max(np.abs(ys_plain[0] - ys_ref[0])) > 0.1) == takes_path
    # An example's output does not depend on the rest of its batch.
    other = xs[0].copy()
    other[2:] = rng.normal(-5.0, 3.0, other[2:].shape)
    y, _ = step(params, state, xs[0], masks[0], mode)
    y_other, _ = step(params, state, other, masks[0], mode)
    np.testing.assert_allclose(y_other[1], y[1], rtol=1e-6, atol=1e-6)
    plain = jbn.Stream(horizon=50.0, prior=8.0, surprise=0.5, anchor=None, settle=None)
    y_plain, _ = step(params, state, other, masks[0], plain)
    assert (np.max(np.abs(np.asarray(y_plain[1]) - np.asarray(y[1]))) > 0.1) == takes_path


def test_a_young_memory_differentiates_as_the_prior_mode_on_each_example_alone():
    rng, params, state = setup(12)
    mode = jbn.Stream(50.0, 8.0, anchor=None)
    x = jnp.asarray(rng.normal(1.0, 2.0, (4, 2, 2, C)), jnp.float32)
    young = {**jbn.start_stream(state, mode), "stream_count": jnp.full(C, 2.0, jnp.float32)}
    as_prior = {"mean": young["stream_mean"], "var": young["stream_var"]}

    def loss(p, x):
        return jnp.sum(jnp.sin(jbn.bn_forward(p, young, x, mode)[0]))

    def alone(p, x):  # each example its own batch in the prior mode, N = 1
        ys = [jbn.bn_forward(p, as_prior, x[i : i + 1], jbn.Prior(1.0))[0] for i in range(4)]
        return jnp.sum(jnp.sin(jnp.concatenate(ys)))

    # Compiled once each (check_grads calls loss again with the same shapes), not op by op.
    loss_jit, alone_jit = jax.jit(loss), jax.jit(alone)
    np.testing.assert_allclose(loss_jit(params, x), alone_jit(params, x), rtol=1e-5)
    got = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    want = jax.jit(jax.grad(alone, (0, 1)))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    check_grads(loss_jit, (params, x), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)


def each_alone(params, state, x, train):
    """``bn_forward`` on each example of ``x`` as a batch of its own, concatenated."""
    ys = [jbn.bn_forward(params, state, x[i : i + 1], train)[0] for i in range(len(x))]
    return jnp.concatenate(ys)


def test_infinite_horizon_with_surprise_stays_the_prior_on_each_example():
    rng, params, state = setup(9)
    x = rng.normal(3.0, 2.0, (8, 2, 2, C)).astype(np.float32)
    y, s = step(params, state, x, None, jbn.Stream(math.inf, 4.0, surprise=0.5))
    np.testing.assert_allclose(
        y, each_alone(params, state, x, jbn.Prior(4.0)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(s["stream_mean"], state["mean"])
    assert np.all(np.isinf(s["stream_count"]))
    dense = x[:, 0, 0]  # one value per feature: the training statistics alone
    y, _ = step(params, state, dense, None, jbn.Stream(math.inf, 4.0, surprise=0.5))
    np.testing.assert_allclose(y, jbn.bn_forward(params, state, dense, False)[0], rtol=1e-6)


def test_infinite_horizon_is_the_prior_and_zero_prior_is_each_examples_statistics():
    rng, params, state = setup(1)
    xs = [rng.normal(3.0, 2.0, (8, 2, 2, C)).astype(np.float32) for _ in range(3)]
    s_inf, s_zero = state, state
    for x in xs:
        y, s_inf = step(params, s_inf, x, None, jbn.Stream(math.inf, 4.0))
        want = each_alone(params, state, x, jbn.Prior(4.0))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s_inf["stream_mean"], state["mean"])
        np.testing.assert_array_equal(s_inf["stream_var"], state["var"])
        y, s_zero = step(params, s_zero, x, None, jbn.Stream(16.0, 0.0))
        want = each_alone(params, state, x, True)  # instance normalization
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    assert not np.array_equal(s_zero["stream_mean"], state["mean"])  # it still remembers


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_never_enter_the_memory(bad):
    rng, params, state = setup(2)
    mode = jbn.Stream(20.0, 8.0, anchor=None)  # a re-seed would rewrite every feature's memory
    y0, s = step(params, state, rng.normal(1, 2, (8, C)).astype(np.float32), None, mode)
    x = rng.normal(1, 2, (8, C)).astype(np.float32)
    x[3, 1] = bad
    y, s2 = step(params, s, x, None, mode)
    for k in ("stream_mean", "stream_var", "stream_count"):
        np.testing.assert_array_equal(s2[k][1], s[k][1])  # feature 1 kept its memory
        assert np.all(np.isfinite(s2[k]))
    assert not np.array_equal(s2["stream_mean"][0], s["stream_mean"][0])
    # The other examples of feature 1 are normalized with the memory alone.
    memory_only = {"mean": s["stream_mean"], "var": s["stream_var"]}
    want, _ = jbn.bn_forward(params, memory_only, x, False)
    keep = np.arange(8) != 3
    np.testing.assert_allclose(np.asarray(y)[keep, 1], np.asarray(want)[keep, 1], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(y)[keep]))


def test_reset_is_bit_identical_to_the_start():
    rng, params, state = setup(3)
    mode = jbn.Stream(10.0, 2.0)
    xs = [rng.normal(-1, 3, (8, C)).astype(np.float32) for _ in range(3)]
    y_first, s = step(params, state, xs[0], None, mode)
    for x in xs[1:]:
        _, s = step(params, s, x, None, mode)
    back = jbn.reset_stream(s)
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    y_again, _ = step(params, back, xs[0], None, mode)
    np.testing.assert_array_equal(y_again, y_first)
    # start_stream seeds the same memory the first call makes.
    y_started, _ = step(params, jbn.start_stream(state, mode), xs[0], None, mode)
    np.testing.assert_array_equal(y_started, y_first)


def test_scan_over_a_stream_and_bf16():
    rng, params, state = setup(4)
    mode = jbn.Stream(24.0, 6.0)
    xs = rng.normal(5, 2, (6, 8, C)).astype(np.float32)
    ys_ref, mem_ref = np_stream(xs, [None] * 6, params["scale"], params["bias"],
                                state["mean"], state["var"], 24.0, 6.0)  # fmt: skip

    @jax.jit
    def run(state, xs):
        return jax.lax.scan(lambda s, x: jbn.bn_forward(params, s, x, mode)[::-1], state, xs)

    s, ys = run(jbn.start_stream(state, mode), xs)
    np.testing.assert_allclose(ys, np.stack(ys_ref), rtol=3e-5, atol=3e-5)
    assert_memory(s, mem_ref[-1])
    # bf16 input: float32 memory, bf16 output, the same statistics as the rounded input's.
    xb = jnp.asarray(xs, jnp.bfloat16)
    s16, ys16 = run(jbn.start_stream(state, mode), xb)
    assert ys16.dtype == jnp.bfloat16 and s16["stream_mean"].dtype == jnp.float32
    s32, _ = run(jbn.start_stream(state, mode), xb.astype(jnp.float32))
    for k in ("stream_mean", "stream_var", "stream_count"):
        np.testing.assert_allclose(s16[k], s32[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, C), (8, 2, 2, C)], ids=["dense", "nhwc"])
def test_gradient_through_each_examples_share_only(shape):
    _, params, state = setup(5)
    mode = jbn.Stream(10.0, 3.0, surprise=None, anchor=None, settle=None)  # the memory as prior
    x = jnp.asarray(np.random.default_rng(5).normal(1, 2, shape), jnp.float32)
    s = jbn.start_stream(state, mode)
    s = {**s, "stream_mean": s["stream_mean"] + 0.5}
    as_prior = {"mean": s["stream_mean"], "var": s["stream_var"]}

    def loss(p, x, st):
        return jnp.sum(jnp.sin(jbn.bn_forward(p, st, x, mode)[0]))

    def alone(p, x):  # the prior mode on each example, N = 3; the memory alone for dense input
        train = jbn.Prior(3.0) if len(shape) > 2 else False
        return jnp.sum(jnp.sin(each_alone(p, as_prior, x, train)))

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, s)
    want = jax.jit(jax.grad(alone, argnums=(0, 1)))(params, x)
    for got, ref in zip(jax.tree.leaves(g[:2]), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    for k in ("stream_mean", "stream_var"):
        np.testing.assert_array_equal(g[2][k], 0.0)
    # With every default (some examples anchored or young here), still none into the memory.
    g_state = jax.jit(
        jax.grad(
            lambda st: jnp.sum(jnp.sin(jbn.bn_forward(params, st, x, jbn.Stream(10.0, 3.0))[0]))
        )
    )(s)
    for k in ("stream_mean", "stream_var"):
        np.testing.assert_array_equal(g_state[k], 0.0)


@pytest.mark.parametrize("surprise", [None, 0.6])
def test_four_devices_unequal_counts_match_numpy(four_devices, surprise):
    rng, params, state = setup(6)
    mode = jbn.Stream(20.0, 5.0, surprise=surprise)
    mesh = Mesh(np.array(four_devices), ("data",))
    xs = rng.normal(2, 3, (3, 8, C)).astype(np.float32)
    # 8 examples, 2 per device; the masks count unequal numbers on each device (some none).
    keeps = ([0, 1, 2, 5], [7], [0, 2, 3, 4, 6])
    masks = np.stack([np.isin(np.arange(8), keep)[:, None] for keep in keeps])

    def per_device(state, x, mask):
        return jbn.bn_forward(params, state, x, mode, mask=mask, axis_name="data")

    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                out_specs=(P("data"), P())))  # fmt: skip
    ys_ref, mem_ref = np_stream(xs, list(masks), params["scale"], params["bias"],
                                state["mean"], state["var"], 20.0, 5.0, surprise)  # fmt: skip
    s = jbn.start_stream(state, mode)
    for x, mask, y_ref, memory in zip(xs, masks, ys_ref, mem_ref, strict=True):
        y, s = run(s, x, mask)
        rows = mask[:, 0]
        np.testing.assert_allclose(np.asarray(y)[rows], y_ref[rows], rtol=3e-5, atol=3e-5)
        assert_memory(s, memory)


def test_modes_are_hashable_values_and_the_old_keywords_are_the_prior_mode():
    _, params, state = setup(7)
    x = jnp.ones((4, C)) * jnp.arange(4.0)[:, None]
    assert hash(jbn.Stream(100.0, 8.0)) == hash(jbn.Stream(100, 8))
    assert jbn.Prior(4) == jbn.Prior(4.0, "pooled")
    for form in ("pooled", "linear"):
        old, _ = jbn.bn_forward(params, state, x, False, prior=4.0, prior_form=form)
        new, out = jbn.bn_forward(params, state, x, jbn.Prior(4.0, form))
        np.testing.assert_array_equal(new, old)
        assert out.keys() == state.keys()
    # Training and evaluation carry a memory through untouched.
    _, s = jbn.bn_forward(params, state, x, jbn.Stream(8.0, 2.0))
    for train in (True, False):
        _, out = jbn.bn_forward(params, s, x, train)
        for k in ("stream_mean", "stream_var", "stream_count"):
            np.testing.assert_array_equal(out[k], s[k])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: jbn.Stream(0.0, 1.0), ValueError, "horizon must be > 0"),
        (lambda: jbn.Stream(10.0, -1.0), ValueError, "prior must be >= 0"),
        (lambda: jbn.Stream("long"), TypeError, "horizon must be a Python float"),
        (lambda: jbn.Stream(10.0, 1.0, surprise=0.0), ValueError, "surprise must be > 0"),
        (lambda: jbn.Stream(10.0, 1.0, anchor=-1.0), ValueError, "anchor must be > 0"),
        (lambda: jbn.Stream(10.0, 1.0, anchor="on"), TypeError, "anchor must be a Python float"),
        (lambda: jbn.Stream(settle=0.0), ValueError, r"settle must be > 0.0 and <= 1.0"),
        (lambda: jbn.Stream(settle=1.5), ValueError, r"settle must be > 0.0 and <= 1.0, got 1.5"),
        (lambda: jbn.Prior(-2.0), ValueError, "prior must be >= 0"),
        (lambda: jbn.Prior(2.0, "mixed"), ValueError, "prior_form must be one of"),
        (lambda: jbn.start_stream({"mean": 0.0}, jbn.Stream()), ValueError, "missing 'var'"),
        (lambda: jbn.start_stream(jbn.bn_init(2)[1], 5.0), TypeError, "jbn.Stream"),
        (lambda: jbn.reset_stream([1.0]), TypeError, "state must be a dict"),
    ],
)
def test_bad_modes(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_calls():
    params, state = jbn.bn_init(C)
    x = jnp.ones((4, C))
    with pytest.raises(ValueError, match="already is a mode"):
        jbn.bn_forward(params, state, x, jbn.Stream(), prior=2.0)
    with pytest.raises(TypeError, match=r"train must be a Python bool or a mode \(jbn.Prior"):
        jbn.bn_forward(params, state, x, "stream")
    with pytest.raises(ValueError, match="partial stream memory, missing"):
        jbn.bn_forward(params, {**state, "stream_mean": state["mean"]}, x, jbn.Stream())
    bad = {**jbn.start_stream(state, jbn.Stream()), "stream_count": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"state\['stream_count'\] must have the feature shape"):
        jbn.bn_forward(params, bad, x, jbn.Stream())


@pytest.mark.parametrize("shape", [(8, C), (8, 3, 3, C)], ids=["dense", "nhwc"])
def test_gate_lets_only_examples_far_from_training_cut_as_numpy_does(shape):
    """After a shift, examples like the training data surprise the memory but do not cut it.

    Two batches far from the training statistics, then two drawn like the
    training data (|log r| under them near 0), then one of each half. Without
    the gate the return would cut the memory; with it, only far examples cut.
    """
    rng, params, state = setup(13)
    sd = np.sqrt(np.asarray(state["var"]))
    near = [np.asarray(state["mean"]) + sd * rng.normal(size=shape) for _ in range(3)]
    far = [rng.normal(3.0, 2.5, shape) for _ in range(3)]
    xs = far[:2] + near[:2] + [np.concatenate([near[2][:4], far[2][4:]])]
    xs = [x.astype(np.float32) for x in xs]
    masks = [None, None, None, rng.uniform(size=shape) > 0.2, None]
    args = (params["scale"], params["bias"], state["mean"], state["var"], 40.0, 4.0, 0.6)
    verdicts = np_verdicts(xs, state["mean"], state["var"])
    assert verdicts[0].all() and verdicts[2].mean() < 0.5 and verdicts[4][4:].all()
    mode = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.6, anchor=None, gate=0.8)
    ys_ref, mem_ref = np_stream(xs, masks, *args, anchor=None, gate=0.8)
    check_stream_steps(params, state, mode, xs, masks, ys_ref, mem_ref)
    # The gate is what the memory followed: with every example cutting, it differs.
    ys_all, mem_all = np_stream(xs, masks, *args, anchor=None, gate=None)
    assert max(abs(a[0][0] - b[0][0]) for a, b in zip(mem_ref, mem_all, strict=True)) > 1.0
    ungated = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.6, anchor=None, gate=None)
    check_stream_steps(params, state, ungated, xs, masks, ys_all, mem_all)
