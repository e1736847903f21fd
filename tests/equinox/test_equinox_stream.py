"""jbn.equinox.use_stream: the memory lives in the eqx.nn.State and matches the core's and an
independent NumPy transcription of Chan's pooling; Tent carries it; filter_jit keys on the settings."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
import jbn.equinox
from tests.helpers import RELAY, relay_stream
from tests.np_reference import np_prior_each, np_stream_memories, np_stream_memory

MODE = jbn.Stream(horizon=20.0, prior=4.0)


def test_memory_in_the_state_matches_the_core_and_resets():
    bn, state0 = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch", dtype=np.float32)
    bn, state = jbn.equinox.use_stream(eqx.nn.inference_mode(bn), state0, MODE)
    start = state.get(bn.state_index)

    @eqx.filter_jit
    def run(x, state):
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    params = {"scale": bn.weight, "bias": bn.bias}
    core = {"mean": start["mean"], "var": start["var"]}
    for xb in jax.random.normal(jax.random.key(2), (3, 6, 3)) * 2 + 1:
        want, core = jbn.bn_forward(params, core, xb, MODE)
        y, state = run(xb, state)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
        for k in ("stream_mean", "stream_var", "stream_count"):
            np.testing.assert_allclose(state.get(bn.state_index)[k], core[k], rtol=1e-6)
    back = jbn.equinox.reset_stream(bn, state).get(bn.state_index)
    for k, v in start.items():
        np.testing.assert_array_equal(back[k], v)
    plain, out = jbn.equinox.use_stream(bn, state, None)
    assert plain.stream is None and set(out.get(bn.state_index)) == set(state0.get(bn.state_index))
    with pytest.raises(ValueError, match="found no batch norm"):
        jbn.equinox.use_stream(eqx.nn.Linear(2, 3, key=jax.random.key(0)), state0, MODE)
    with pytest.raises(ValueError, match="no batch norm of the model is in the stream mode"):
        jbn.equinox.reset_stream(plain, out)


# The pooling alone, without the surprise cut, so NumPy can follow it step by step.
PLAIN = jbn.Stream(horizon=40.0, prior=4.0, surprise=None)
RUNNING = (np.array([-1.0, 0.0, 0.5], np.float32), np.array([0.5, 1.0, 2.0], np.float32))
MEMORY = ("stream_mean", "stream_var", "stream_count")


def batch_norm():
    """A jbn.equinox.BatchNorm of 3 features with running statistics RUNNING, and its state."""
    bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch", dtype=np.float32)
    stored = state.get(bn.state_index)
    stored = {**stored, "mean": jnp.asarray(RUNNING[0]), "var": jnp.asarray(RUNNING[1])}
    return eqx.nn.inference_mode(bn), state.set(bn.state_index, stored)


def assert_memory(entry, want, rtol=2e-5):
    for k, v in zip(MEMORY, want, strict=True):
        np.testing.assert_allclose(entry[k], v, rtol=rtol, atol=1e-5)


def test_memory_of_conv_shaped_input_matches_numpy_chan_pooling():
    # Equinox's layout: each example (channels, height, width), mapped over the batch.
    bn, state = batch_norm()
    bn, state = jbn.equinox.use_stream(bn, state, PLAIN)
    xs = jax.random.normal(jax.random.key(3), (2, 6, 3, 4, 4)) * 2.0 + 3.0
    want = np_stream_memories(RUNNING, xs, PLAIN.horizon, axis=1)

    @eqx.filter_jit
    def run(x, state):
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    for xb, memory in zip(xs, want, strict=True):
        _, state = run(xb, state)
        assert_memory(state.get(bn.state_index), memory)
    # The batch's mean is far from the memory's: Chan's between-means term weighs here.
    w = PLAIN.horizon / (PLAIN.horizon + 6)
    term = w * (1 - w) * (RUNNING[0] - np.asarray(xs[0]).mean((0, 2, 3))) ** 2
    assert np.max(term / want[0][1]) > 0.05


class InputBN(eqx.Module):
    """A batch norm on the input itself, so its memory does not depend on TENT's steps."""

    bn: jbn.equinox.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, bn):
        self.bn = bn
        self.head = eqx.nn.Linear(3, 3, key=jax.random.key(0))

    def __call__(self, x, state):
        h, state = self.bn(x, state)
        return self.head(h), state


def test_tent_carries_the_memory_and_a_non_finite_step_keeps_it():
    bn, state = batch_norm()
    model = InputBN(bn)
    xs = jax.random.normal(jax.random.key(5), (3, 8, 3)) * 1.5 + jnp.array([[[2.0, -1.0, 0.5]]])
    tent = jbn.equinox.Tent(model, state, tx=optax.adam(1e-2), stream=PLAIN)
    tent.update(xs[0])
    tent.update(xs[1])
    want = np_stream_memories(RUNNING, xs[:2], PLAIN.horizon)
    assert_memory(tent.state.get(bn.state_index), want[1])
    alone = np_stream_memories(RUNNING, xs[1:2], PLAIN.horizon)[0]
    assert np.max(np.abs(alone[0] - want[1][0])) > 0.05  # forgetting step 1 would show
    # One NaN value: the step is skipped and the whole memory stays, bit for bit, though the
    # core alone would take the batch into the finite features.
    before = {k: np.asarray(v) for k, v in tent.state.get(bn.state_index).items()}
    tent.update(xs[2].at[0, 0].set(jnp.nan))
    assert tent.skipped == 1
    after = tent.state.get(bn.state_index)
    assert set(after) == set(before)
    for k, b in before.items():
        assert np.asarray(after[k]).tobytes() == b.tobytes(), k


def test_stream_settings_enter_the_jit_cache_key():
    plain, state0 = batch_norm()
    x = jax.random.normal(jax.random.key(6), (8, 3, 2, 2)) * 2.0 + 1.0  # H·W values per example
    traces = []

    @eqx.filter_jit
    def f(bn, state, x):
        traces.append(1)
        return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    for horizon, prior in ((10.0, 2.0), (50.0, 30.0), (10.0, 2.0)):
        bn, state = jbn.equinox.use_stream(plain, state0, jbn.Stream(horizon, prior, surprise=None))
        y, state = f(bn, state, x)
        want = np_prior_each(x, bn.weight, bn.bias, *RUNNING, prior, axis=1)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        memory = np_stream_memory((*RUNNING, horizon), x, horizon, axis=1)
        assert_memory(state.get(bn.state_index), memory)
    assert len(traces) == 2  # the first settings again: jit's cache, no new trace


class TwoBatchNorms(eqx.Module):
    first: jbn.equinox.BatchNorm
    second: jbn.equinox.BatchNorm

    def __init__(self):
        self.first = jbn.equinox.BatchNorm(3, "batch", dtype=np.float32)
        self.second = jbn.equinox.BatchNorm(3, "batch", dtype=np.float32)

    def __call__(self, x, z, state):
        y, state = self.first(x, state)
        w, state = self.second(z, state)
        return (y, w), state


def test_the_first_batch_norms_verdict_gates_the_next_ones_cut_as_numpy_does():
    """Per example under vmap: the second layer's memory is cut only by examples the first
    finds far from training."""
    _, xs, zs, first, second, _ = relay_stream()
    model, state = eqx.nn.make_with_state(TwoBatchNorms)()
    for bn in (model.first, model.second):
        stored = {**state.get(bn.state_index), "mean": RUNNING[0], "var": RUNNING[1]}
        state = state.set(bn.state_index, jax.tree.map(jnp.asarray, stored))
    model, state = jbn.equinox.use_stream(eqx.nn.inference_mode(model), state, RELAY)

    @eqx.filter_jit
    def run(model, x, z, state):
        return jax.vmap(model, axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None))(
            x, z, state
        )

    for x, z, want_first, want_second in zip(xs, zs, first, second, strict=True):
        # Equinox's layout: each example (channels, height, width).
        _, state = run(model, x.transpose(0, 3, 1, 2), z.transpose(0, 3, 1, 2), state)
        assert_memory(state.get(model.first.state_index), want_first)
        assert_memory(state.get(model.second.state_index), want_second)
        # No traced verdict outlives its trace (jax.checking_leaks would say).
        assert model.first.stream_link.relay._verdict is None


class SplitBN(eqx.Module):
    """Two batch norms on the example's halves of channels (memories independent of TENT)."""

    two: TwoBatchNorms
    head: eqx.nn.Linear

    def __init__(self):
        self.two = TwoBatchNorms()
        self.head = eqx.nn.Linear(6, 3, key=jax.random.key(0))

    def __call__(self, x, state):
        (y, w), state = self.two(x[:3], x[3:], state)
        return self.head(jnp.concatenate([y, w]).mean((1, 2))), state


def test_tent_relays_the_first_verdict_as_use_stream_does():
    _, xs, zs, first, second, _ = relay_stream()
    model, state = eqx.nn.make_with_state(SplitBN)()
    for bn in (model.two.first, model.two.second):
        stored = {**state.get(bn.state_index), "mean": RUNNING[0], "var": RUNNING[1]}
        state = state.set(bn.state_index, jax.tree.map(jnp.asarray, stored))
    tent = jbn.equinox.Tent(eqx.nn.inference_mode(model), state, tx=optax.adam(1e-2), stream=RELAY)
    for x, z, want_first, want_second in zip(xs, zs, first, second, strict=True):
        tent.update(jnp.concatenate([x, z], -1).transpose(0, 3, 1, 2))
        assert_memory(tent.state.get(model.two.first.state_index), want_first)
        assert_memory(tent.state.get(model.two.second.state_index), want_second)
