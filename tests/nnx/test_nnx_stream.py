"""jbn.nnx.use_stream: the memory lives in nnx.BatchStat variables and matches the core's and an
independent NumPy transcription of Chan's pooling; Tent carries it; nnx.jit keys on the settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jbn
from tests.helpers import RELAY, relay_stream
from tests.np_reference import np_prior_each, np_stream_memories, np_stream_memory

MODE = jbn.Stream(horizon=20.0, prior=4.0)


def test_memory_in_batch_stats_matches_the_core_and_resets():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(1)))
    model.eval()
    model = jbn.nnx.use_stream(model, MODE)
    bn = model.layers[1]
    start = {k: getattr(bn, k)[...] for k in ("stream_mean", "stream_var", "stream_count")}
    assert isinstance(bn.stream_mean, nnx.BatchStat)
    params = {"scale": bn.scale[...], "bias": bn.bias[...]}
    state = {"mean": bn.mean[...], "var": bn.var[...]}
    run = nnx.jit(lambda m, x: m(x))
    for xb in jax.random.normal(jax.random.key(2), (3, 6, 2)) * 2 + 1:
        want, state = jbn.bn_forward(params, state, model.layers[0](xb), MODE)
        np.testing.assert_allclose(run(model, xb), want, rtol=1e-6, atol=1e-6)
        for k in start:
            np.testing.assert_allclose(getattr(bn, k)[...], state[k], rtol=1e-6)
    jbn.nnx.reset_stream(model)
    for k, v in start.items():
        np.testing.assert_array_equal(getattr(bn, k)[...], v)
    model = jbn.nnx.use_stream(model, None)
    assert not hasattr(bn, "stream_mean") and bn.stream is None
    with pytest.raises(ValueError, match="found no batch norm"):
        jbn.nnx.use_stream(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), MODE)


# The pooling alone, without the surprise cut, so NumPy can follow it step by step.
PLAIN = jbn.Stream(horizon=40.0, prior=4.0, surprise=None)
RUNNING = (jnp.array([-1.0, 0.0, 0.5]), jnp.array([0.5, 1.0, 2.0]))
MEMORY = ("stream_mean", "stream_var", "stream_count")


def with_running(bn):
    bn.mean[...], bn.var[...] = RUNNING
    return bn


def assert_memory(bn, want, rtol=2e-5):
    for k, v in zip(MEMORY, want, strict=True):
        np.testing.assert_allclose(getattr(bn, k)[...], v, rtol=rtol, atol=1e-5)


def test_memory_matches_numpy_chan_pooling():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(1)))
    with_running(model.layers[1])
    model.eval()
    model = jbn.nnx.use_stream(model, PLAIN)
    xs = jax.random.normal(jax.random.key(3), (2, 6, 2)) * 2.0 + 3.0
    hs = [model.layers[0](xb) for xb in xs]
    want = np_stream_memories(RUNNING, hs, PLAIN.horizon)
    run = nnx.jit(lambda m, x: m(x))
    for xb, memory in zip(xs, want, strict=True):
        run(model, xb)
        assert_memory(model.layers[1], memory)
    # The batch's mean is far from the memory's: Chan's between-means term weighs here.
    w = PLAIN.horizon / (PLAIN.horizon + 6)
    term = w * (1 - w) * (np.asarray(RUNNING[0]) - np.asarray(hs[0]).mean(0)) ** 2
    assert np.max(term / want[0][1]) > 0.05


class InputBN(nnx.Module):
    """A batch norm on the input itself, so its memory does not depend on TENT's steps."""

    def __init__(self, rngs):
        self.bn = with_running(nnx.BatchNorm(3, rngs=rngs))
        self.head = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.bn(x))


def test_tent_carries_the_memory_and_a_non_finite_step_keeps_it():
    model = InputBN(nnx.Rngs(0))
    model.eval()
    xs = jax.random.normal(jax.random.key(5), (3, 8, 3)) * 1.5 + jnp.array([[[2.0, -1.0, 0.5]]])
    tent = jbn.nnx.Tent(model, tx=optax.adam(1e-2), stream=PLAIN)
    tent.update(xs[0])
    tent.update(xs[1])
    want = np_stream_memories(RUNNING, xs[:2], PLAIN.horizon)
    assert_memory(model.bn, want[1])
    alone = np_stream_memories(RUNNING, xs[1:2], PLAIN.horizon)[0]
    assert np.max(np.abs(alone[0] - want[1][0])) > 0.05  # forgetting step 1 would show
    # One NaN value: the step is skipped and the whole memory stays, bit for bit, though the
    # core alone would take the batch into the finite features.
    before = [np.asarray(getattr(model.bn, k)[...]) for k in MEMORY]
    tent.update(xs[2].at[0, 0].set(jnp.nan))
    assert tent.skipped == 1
    for k, b in zip(MEMORY, before, strict=True):
        assert np.asarray(getattr(model.bn, k)[...]).tobytes() == b.tobytes()


def test_stream_settings_enter_the_jit_cache_key():
    bn = with_running(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    bn.eval()
    scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
    x = jax.random.normal(jax.random.key(6), (8, 2, 2, 3)) * 2.0 + 1.0  # H·W values per example
    traces = []

    @nnx.jit
    def f(m, x):
        traces.append(1)
        return m(x)

    for horizon, prior in ((10.0, 2.0), (50.0, 30.0), (10.0, 2.0)):
        bn = jbn.nnx.use_stream(bn, jbn.Stream(horizon, prior, surprise=None))
        y = f(bn, x)
        want = np_prior_each(x, scale, bias, *RUNNING, prior)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        assert_memory(bn, np_stream_memory((*RUNNING, horizon), x, horizon))
    assert len(traces) == 2  # the first settings again: jit's cache, no new trace


class TwoBatchNorms(nnx.Module):
    def __init__(self):
        self.first = with_running(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
        self.second = with_running(jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(1)))

    def __call__(self, x, z):
        return self.first(x), self.second(z)


def test_the_first_batch_norms_verdict_gates_the_next_ones_cut_as_numpy_does():
    """The second batch norm's memory is cut only by examples the first finds far from training."""
    _, xs, zs, first, second, _ = relay_stream()
    model = TwoBatchNorms()
    model.eval()
    model = jbn.nnx.use_stream(model, RELAY)
    run = nnx.jit(lambda m, x, z: m(x, z))
    for x, z, want_first, want_second in zip(xs, zs, first, second, strict=True):
        run(model, x, z)
        assert_memory(model.first, want_first)
        assert_memory(model.second, want_second)
        # No traced verdict outlives its trace (jax.checking_leaks would say).
        assert model.first.stream_link.relay._verdict is None


class SplitBN(nnx.Module):
    """Two batch norms on the input's halves of channels (their memories do not depend on TENT)."""

    def __init__(self):
        self.two = TwoBatchNorms()
        self.head = nnx.Linear(6, 3, rngs=nnx.Rngs(2))

    def __call__(self, x):
        y, w = self.two(x[..., :3], x[..., 3:])
        return self.head(jnp.concatenate([y, w], -1).mean((1, 2)))


def test_tent_relays_the_first_verdict_as_use_stream_does():
    _, xs, zs, first, second, _ = relay_stream()
    model = SplitBN()
    model.eval()
    tent = jbn.nnx.Tent(model, tx=optax.adam(1e-2), stream=RELAY)
    for x, z, want_first, want_second in zip(xs, zs, first, second, strict=True):
        tent.update(jnp.concatenate([x, z], -1))
        assert_memory(model.two.first, want_first)
        assert_memory(model.two.second, want_second)
