"""The relay that carries a forward pass's first stream-mode verdict to its later batch norms.

Where a pass starts is found, not announced: a layer that ran already, another
JAX trace, another model call (root) or a verdict of another shape starts one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from jbn import _relay


def test_the_first_layer_gives_the_verdict_and_the_next_ones_receive_it():
    relay = _relay.Relay()
    verdict = jnp.array([True, False])
    assert relay.receive("a", None, (2,)) is None  # the first layer: a new pass
    relay.send(verdict)
    relay.send(jnp.array([False, False]))  # a later layer's own verdict is not kept
    assert relay.receive("b", None, (2,)) is verdict
    assert relay.receive("c", None, (2,)) is verdict
    assert relay.receive("a", None, (2,)) is None  # "a" again: the next pass
    relay.send(jnp.array([False, True]))
    np.testing.assert_array_equal(relay.receive("b", None, (2,)), [False, True])


def test_another_root_shape_or_trace_starts_a_new_pass():
    relay = _relay.Relay()
    root = object()
    relay.receive("a", root, (2,))
    relay.send(jnp.array([True, True]))
    assert relay.receive("b", object(), (2,)) is None  # another model call
    relay.send(jnp.array([True, True]))
    assert relay.receive("c", relay._root, (3,)) is None  # a verdict of another shape

    @jax.jit
    def inside(x):
        return x if relay.receive("d", relay._root, (3,)) is None else x + 1.0

    relay.send(jnp.array([True, True, True]))  # made outside jit: never leaks into it
    np.testing.assert_array_equal(inside(jnp.zeros(3)), 0.0)


def test_a_batch_norm_outside_a_link_gives_its_own_verdict_and_one_inside_receives():
    """bn_forward on a link: the second call takes the first call's verdict for its cut."""
    params, state = jbn.bn_init(2)
    mode = jbn.Stream(horizon=10.0, prior=2.0, surprise=0.5, anchor=None, gate=0.8)
    # Values close to the training mean: r = 0.42 under the training statistics, |log r| > 0.8.
    compressed = jnp.zeros((2, 3, 3, 2)) + jnp.linspace(-1.0, 1.0, 9).reshape(1, 3, 3, 1)
    typical = jax.random.normal(jax.random.key(0), (2, 3, 3, 2))  # r near 1: not far
    shifted = typical * 3.0 + 2.0  # surprising to the memory and far from training
    own = jbn.bn_forward(params, state, shifted, mode)[1]["stream_count"]
    relay = _relay.Relay()
    with _relay.linked(relay, "first"):
        jbn.bn_forward(params, state, typical, mode)  # its verdict: no example is far
    with _relay.linked(relay, "second"):
        relayed = jbn.bn_forward(params, state, shifted, mode)[1]["stream_count"]
    assert float(own[0]) < 5.0  # alone, the shifted batch cuts the memory hard
    np.testing.assert_array_equal(relayed, 10.0)  # relayed, nothing may cut it
    with _relay.linked(relay, "first"):  # the next pass: a verdict that lets both cut
        jbn.bn_forward(params, state, compressed, mode)
    with _relay.linked(relay, "second"):
        np.testing.assert_array_equal(
            jbn.bn_forward(params, state, shifted, mode)[1]["stream_count"], own
        )
