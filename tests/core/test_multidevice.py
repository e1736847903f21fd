"""Four shards give what one device gives on the whole batch.

conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax
is imported; run this file alone the same way (see README).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn

SHAPE = (16, 3, 3, 5)  # NHWC; 4 examples per device


def data(seed=0):
    kx, kw, kv = jax.random.split(jax.random.key(seed), 3)
    x = 3.0 + 2.0 * jax.random.normal(kx, SHAPE)
    w = jax.random.normal(kw, SHAPE)
    params, state = random_variables(
        kv, (5,), scale_std=0.3, bias_std=0.1, mean_std=0.0, var_range=(1.0, 1.0)
    )
    return x, w, params, state


def unequal_mask():
    # Device i keeps i+1 of its 4 examples (device 0 keeps only its first one).
    keep = np.zeros((4, 4), bool)
    for i in range(4):
        keep[i, : i + 1] = True
    return jnp.asarray(keep.reshape(16, 1, 1, 1))


def loss(params, state, x, w, mask, axis_name):
    y, new = jbn.bn_forward(params, state, x, True, mask=mask, momentum=0.9, axis_name=axis_name)
    return jnp.sum(jnp.sin(y) * w), (y, new)


def single_device(params, state, x, w, mask):
    grad = jax.grad(loss, argnums=(0, 2), has_aux=True)
    (gp, gx), (y, new) = jax.jit(grad, static_argnums=5)(params, state, x, w, mask, None)
    return y, new, gp, gx


def assert_close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), a, b)


@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_with_replicated_params_matches_one_device(four_devices, masked):
    x, w, params, state = data()
    mask = unequal_mask() if masked else jnp.ones((16, 1, 1, 1), bool)
    mesh = Mesh(np.array(four_devices), ("data",))

    def sharded_loss(params, state, x, w, mask):
        # Replicated (invariant) params and state, batch sharded over "data".
        def per_device(p, s, x, w, m):
            value, aux = loss(p, s, x, w, m, "data")
            return jax.lax.psum(value, "data"), aux

        f = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data"), P("data")),
            out_specs=(P(), (P("data"), P())),
        )
        return f(params, state, x, w, mask)

    grad = jax.jit(jax.grad(sharded_loss, argnums=(0, 2), has_aux=True))
    (gp, gx), (y, new) = grad(params, state, x, w, mask)
    assert_close((y, new, gp, gx), single_device(params, state, x, w, mask))


def test_shard_map_gradient_inside_the_map(four_devices):
    # grad taken per device inside shard_map: the replicated parameters' cotangent
    # must come back invariant (psummed), as JAX's own autodiff would give it.
    x, w, params, state = data(1)
    mask = unequal_mask()
    mesh = Mesh(np.array(four_devices), ("data",))

    def per_device(p, s, x, w, m):
        (gp, gx), (y, new) = jax.grad(loss, argnums=(0, 2), has_aux=True)(p, s, x, w, m, "data")
        return gp, gx, y, new

    gp, gx, y, new = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data"), P("data")),
            out_specs=(P(), P("data"), P("data"), P()),
        )
    )(params, state, x, w, mask)
    y1, new1, gp1, gx1 = single_device(params, state, x, w, mask)
    assert_close((y, new, gp, gx), (y1, new1, gp1, gx1))


@pytest.mark.parametrize("masked", [False, True])
def test_pmap_with_axis_name_matches_one_device(four_devices, masked):
    x, w, params, state = data(2)
    mask = unequal_mask() if masked else jnp.ones((16, 1, 1, 1), bool)

    def step(p, s, x, w, m):
        (gp, gx), (y, new) = jax.grad(loss, argnums=(0, 2), has_aux=True)(p, s, x, w, m, "batch")
        # The flax examples pmean per-device gradients of per-device mean losses;
        # this loss is a sum over devices, so its gradient is the psum.
        return jax.lax.psum(gp, "batch"), gx, y, new

    split = lambda a: a.reshape(4, 4, *a.shape[1:])  # noqa: E731
    rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (4, *a.shape)), t)  # noqa: E731
    gp, gx, y, new = jax.pmap(step, axis_name="batch", devices=four_devices)(
        rep(params), rep(state), split(x), split(w), split(mask)
    )
    y1, new1, gp1, gx1 = single_device(params, state, x, w, mask)
    assert_close((y.reshape(SHAPE), gx.reshape(SHAPE)), (y1, gx1))
    for i in range(4):
        assert_close(
            (jax.tree.map(lambda a, i=i: a[i], new), jax.tree.map(lambda a, i=i: a[i], gp)),
            (new1, gp1),
        )


def test_jit_with_sharded_batch_needs_no_axis_name(four_devices):
    # Under plain jit with a sharded batch, XLA inserts the collectives itself.
    x, w, params, state = data(3)
    mesh = Mesh(np.array(four_devices), ("data",))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    ones = jnp.ones((16, 1, 1, 1), bool)
    grad = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True), static_argnums=5)
    (gp, gx), (y, new) = grad(params, state, xs, w, ones, None)
    assert_close((y, new, gp, gx), single_device(params, state, x, w, ones))


def test_axis_index_groups_under_pmap(four_devices):
    # Two groups of two devices: each group normalizes with its own statistics.
    x, _, params, state = data(4)
    split = x.reshape(4, 4, 3, 3, 5)

    def f(x):
        return jbn.bn_forward(
            params, state, x, True, axis_name="i", axis_index_groups=[[0, 1], [2, 3]]
        )[0]

    y = jax.pmap(f, axis_name="i", devices=four_devices)(split)
    for g in range(2):
        y1, _ = jbn.bn_forward(params, state, x[8 * g : 8 * g + 8], True)
        np.testing.assert_allclose(
            y[2 * g : 2 * g + 2].reshape(8, 3, 3, 5), y1, rtol=1e-5, atol=1e-5
        )
