"""jbn.linen.use_stream: the memory lives in batch_stats and matches the core's stream mode and
an independent NumPy transcription of Chan's pooling; Tent carries it; jit keys on the settings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
from tests.helpers import RELAY, relay_stream
from tests.np_reference import np_prior_each, np_stream_memories, np_stream_memory

MODE = jbn.Stream(horizon=20.0, prior=4.0)


def test_memory_in_batch_stats_matches_the_core_and_resets():
    model = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
    x = jax.random.normal(jax.random.key(1), (3, 6, 2)) * 2 + 1
    variables = model.init(jax.random.key(0), x[0])
    bn_vars = {"scale": variables["params"]["layers_1"]["scale"],
               "bias": variables["params"]["layers_1"]["bias"]}  # fmt: skip

    @jax.jit
    @jbn.linen.use_stream(MODE)
    def run(v, x):
        return model.apply(v, x, mutable=["batch_stats"])

    core = jax.jit(jbn.bn_forward, static_argnums=3)  # the core reference, compiled
    v, state = variables, dict(variables["batch_stats"]["layers_1"])
    for xb in x:
        h = model.layers[0].apply({"params": variables["params"]["layers_0"]}, xb)
        want, state = core(bn_vars, state, h, MODE)
        y, updates = run(v, xb)
        v = {**v, **updates}
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
        for k in ("stream_mean", "stream_var", "stream_count"):
            np.testing.assert_allclose(
                v["batch_stats"]["layers_1"][k], state[k], rtol=1e-6, atol=1e-6
            )
    back = jbn.linen.reset_stream(v)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    with (
        pytest.raises(ValueError, match=r"pass mutable=\['batch_stats'\]"),
        jbn.linen.use_stream(MODE),
    ):
        model.apply(variables, x[0])
    with pytest.raises(TypeError, match="jbn.Stream"), jbn.linen.use_stream(16.0):  # type: ignore[arg-type]
        pass


# The pooling alone, without the surprise cut, so NumPy can follow it step by step.
PLAIN = jbn.Stream(horizon=40.0, prior=4.0, surprise=None)
RUNNING = {"mean": jnp.array([-1.0, 0.0, 0.5]), "var": jnp.array([0.5, 1.0, 2.0])}


def assert_memory(stats, want, rtol=2e-5):
    mean, var, count = want
    np.testing.assert_allclose(stats["stream_mean"], mean, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(stats["stream_var"], var, rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(stats["stream_count"], count, rtol=1e-6)


def between_means_term(memory, h):
    """w (1 - w) (mu_m - mu_b)^2 of Chan's formula for a batch ``h`` of NHWC or (n, c)."""
    mean_m, _, n_m = (np.asarray(v, np.float64) for v in memory)
    h = np.asarray(h, np.float64)
    w = n_m / (n_m + len(h))
    return w * (1 - w) * (mean_m - h.mean(tuple(range(h.ndim - 1)))) ** 2


def test_memory_of_a_conv_layer_matches_numpy_chan_pooling():
    # NHWC: a conv's output normalized per channel; an example is one image.
    model = nn.Sequential([nn.Conv(3, (3, 3)), nn.BatchNorm(use_running_average=True)])
    x = jax.random.normal(jax.random.key(4), (2, 6, 5, 5, 2)) * 2.0 + 3.0
    variables = model.init(jax.random.key(0), x[0])
    variables = {**variables, "batch_stats": {"layers_1": RUNNING}}

    @jax.jit
    @jbn.linen.use_stream(PLAIN)
    def run(v, x):
        return model.apply(v, x, mutable=["batch_stats"])

    hs = [model.layers[0].apply({"params": variables["params"]["layers_0"]}, xb) for xb in x]
    want = np_stream_memories((RUNNING["mean"], RUNNING["var"]), hs, PLAIN.horizon)
    v = variables
    for xb, memory in zip(x, want, strict=True):
        _, updates = run(v, xb)
        v = {**v, **updates}
        assert_memory(v["batch_stats"]["layers_1"], memory)
    # The batch's mean is far from the memory's: Chan's between-means term weighs here.
    term = between_means_term((RUNNING["mean"], RUNNING["var"], PLAIN.horizon), hs[0])
    assert np.max(term / want[0][1]) > 0.05


class InputBN(nn.Module):
    """A batch norm on the input itself, so its memory does not depend on TENT's steps."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.BatchNorm(use_running_average=True)(x))


def test_tent_carries_the_memory_and_a_non_finite_step_keeps_it():
    model = InputBN()
    xs = jax.random.normal(jax.random.key(5), (3, 8, 3)) * 1.5 + jnp.array([[[2.0, -1.0, 0.5]]])
    variables = model.init(jax.random.key(1), xs[0])
    variables = {**variables, "batch_stats": {"BatchNorm_0": RUNNING}}
    tent = jbn.linen.Tent(
        lambda v, x: model.apply(v, x, mutable=["batch_stats"]),
        variables,
        tx=optax.adam(1e-2),
        stream=PLAIN,
    )
    tent.update(xs[0])
    tent.update(xs[1])
    want = np_stream_memories((RUNNING["mean"], RUNNING["var"]), xs[:2], PLAIN.horizon)
    assert_memory(tent.carry["BatchNorm_0"], want[1])
    # A step that forgot the first would hold the second batch alone: far from the carried one.
    alone = np_stream_memories((RUNNING["mean"], RUNNING["var"]), xs[1:2], PLAIN.horizon)[0]
    assert np.max(np.abs(alone[0] - want[1][0])) > 0.05
    # One NaN value: the step is skipped and the whole memory stays, bit for bit, though the
    # core alone would take the batch into the finite features.
    before = jax.tree.map(np.asarray, tent.carry)
    tent.update(xs[2].at[0, 0].set(jnp.nan))
    assert tent.skipped == 1
    for a, b in zip(jax.tree.leaves(tent.carry), jax.tree.leaves(before), strict=True):
        assert np.asarray(a).tobytes() == b.tobytes()


def test_stream_settings_enter_the_jit_cache_key():
    bn = nn.BatchNorm(use_running_average=True)
    x = jax.random.normal(jax.random.key(6), (8, 2, 2, 3)) * 2.0 + 1.0  # H·W values per example
    v = {**bn.init(jax.random.key(0), x), "batch_stats": RUNNING}
    p = v["params"]
    traces = []

    @jax.jit
    def f(v, x):
        traces.append(1)
        return bn.apply(v, x, mutable=["batch_stats"])

    for horizon, prior in ((10.0, 2.0), (50.0, 30.0), (10.0, 2.0)):
        with jbn.linen.use_stream(jbn.Stream(horizon, prior, surprise=None)):
            y, updates = f(v, x)
        want = np_prior_each(x, p["scale"], p["bias"], RUNNING["mean"], RUNNING["var"], prior)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        memory = np_stream_memory((RUNNING["mean"], RUNNING["var"], horizon), x, horizon)
        assert_memory(updates["batch_stats"], memory)
    assert len(traces) == 2  # the first settings again: jit's cache, no new trace


class TwoBatchNorms(nn.Module):
    @nn.compact
    def __call__(self, x, z):
        return nn.BatchNorm(use_running_average=True)(x), jbn.BatchNorm(use_running_average=True)(z)


def test_the_first_batch_norms_verdict_gates_the_next_ones_cut_as_numpy_does():
    """The second batch norm's memory is cut only by examples the first finds far from training."""
    (mean, var), xs, zs, first, second, _ = relay_stream()
    model = TwoBatchNorms()
    variables = model.init(jax.random.key(0), xs[0], zs[0])
    stats = {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}
    variables = {**variables, "batch_stats": {"BatchNorm_0": stats, "BatchNorm_1": stats}}

    @jax.jit
    @jbn.linen.use_stream(RELAY)
    def run(v, x, z):
        return model.apply(v, x, z, mutable=["batch_stats"])

    v = jbn.linen.start_stream(variables, RELAY)
    for x, z, want_first, want_second in zip(xs, zs, first, second, strict=True):
        _, updates = run(v, x, z)
        v = {**v, **updates}
        assert_memory(v["batch_stats"]["BatchNorm_0"], want_first)
        assert_memory(v["batch_stats"]["BatchNorm_1"], want_second)
        # No traced verdict or model call outlives its trace (jax.checking_leaks would say).
        assert jbn.linen._stream._state.relay._verdict is None
        assert jbn.linen._stream._state.relay._root is None


class SplitBN(nn.Module):
    """Two batch norms on the input's halves of channels (their memories do not depend on TENT)."""

    @nn.compact
    def __call__(self, x):
        y, w = TwoBatchNorms()(x[..., :3], x[..., 3:])
        return nn.Dense(3)(jnp.concatenate([y, w], -1).mean((1, 2)))


def test_tent_relays_the_first_verdict_as_use_stream_does():
    (mean, var), xs, zs, first, second, _ = relay_stream()
    model = SplitBN()
    variables = model.init(jax.random.key(0), jnp.concatenate([xs[0], zs[0]], -1))
    stats = {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}
    bs = {"TwoBatchNorms_0": {"BatchNorm_0": stats, "BatchNorm_1": stats}}
    tent = jbn.linen.Tent(
        lambda v, x: model.apply(v, x, mutable=["batch_stats"]),
        {**variables, "batch_stats": bs},
        tx=optax.adam(1e-2),
        stream=RELAY,
    )
    for x, z, want_first, want_second in zip(xs, zs, first, second, strict=True):
        tent.update(jnp.concatenate([x, z], -1))
        got = tent.carry["TwoBatchNorms_0"]
        assert_memory(got["BatchNorm_0"], want_first)
        assert_memory(got["BatchNorm_1"], want_second)
