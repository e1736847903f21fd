"""One collective round per synchronized forward, exact whatever each device holds.

A ``shard_map``'d layer over 4 CPU devices: the compiled forward holds one
collective (an all-gather of every device's count, shift, mean and M2), the
forward + backward two (the backward's one all-reduce of Σdy and Σdy x̂, which the
parameter cotangents reuse). The statistics are exact at a large offset with
unequal masked counts (against NumPy float64), and every device gets the same bits.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from np_reference import np_backward, np_forward

import jbn

SHAPE = (16, 4, 8)  # (batch, time, features): 4 examples per device
COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)


def _mesh(devices):
    return Mesh(np.array(devices), ("data",))


def _data(dtype, offset=0.0):
    kx, kw = jax.random.split(jax.random.key(0))
    x = (offset + jax.random.normal(kx, SHAPE)).astype(dtype)
    w = jax.random.normal(kw, SHAPE).astype(dtype)
    params = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1.0, 1.0, 8)}
    return x, w, params, jbn.bn_init(8)[1]


def _unequal_mask():
    # Device i keeps i + 1 of its 4 examples; device 0 keeps only its last one, so
    # its first example (where an unmasked shift would come from) is padding.
    keep = np.zeros((4, 4), bool)
    for i in range(4):
        keep[i, 3 - i :] = True
    return jnp.asarray(keep.reshape(16, 1, 1))


def _layer(mesh, masked):
    def per_device(params, state, x, mask):
        return jbn.bn_forward(params, state, x, True, axis_name="data", mask=mask, momentum=0.0)

    mask_spec = P("data") if masked else None
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), mask_spec),
        out_specs=(P("data"), P()),
    )


def _collectives(compiled) -> list[str]:
    return [m.group(1) for m in COLLECTIVE.finditer(compiled.as_text())]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_collective_in_the_forward_two_with_the_backward(four_devices, dtype, masked):
    x, w, params, state = _data(dtype)
    mask = _unequal_mask() if masked else None
    layer = _layer(_mesh(four_devices), masked)

    def loss(params, x):
        y, _ = layer(params, state, x, mask)
        return jnp.vdot(y.astype(jnp.float32), w.astype(jnp.float32))

    forward = jax.jit(layer).lower(params, state, x, mask).compile()
    both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    assert _collectives(forward) == ["all-gather"]
    assert sorted(_collectives(both)) == ["all-gather", "all-reduce"]


@pytest.mark.parametrize("masked", [False, True])
def test_exact_at_a_large_offset_with_unequal_counts(four_devices, masked):
    x, w, params, state = _data(jnp.float32, offset=1e4)
    mask = _unequal_mask() if masked else None
    layer = _layer(_mesh(four_devices), masked)

    def loss(params, x):
        y, new = layer(params, state, x, mask)
        return jnp.vdot(y, w), (y, new)

    (gp, gx), (y, new) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    y_np, mean_np, var_np, _ = np_forward(x, params["scale"], params["bias"], mask=mask)
    dx_np, dscale_np, dbias_np = np_backward(x, params["scale"], w, mask=mask)
    kept = np.broadcast_to(np.ones((16, 1, 1), bool) if mask is None else mask, SHAPE)
    # A float32 x at 1e4 is known to ~1e-3: y = γ(x - μ)/σ + β to that, not to 1e-3 σ worse.
    np.testing.assert_allclose(np.asarray(y)[kept], y_np[kept], atol=2e-3)
    np.testing.assert_allclose(new["mean"], mean_np, rtol=1e-6)
    np.testing.assert_allclose(new["var"], var_np, rtol=1e-3)
    np.testing.assert_allclose(gx, dx_np, atol=2e-3)
    np.testing.assert_allclose(gp["scale"], dscale_np, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(gp["bias"], dbias_np, rtol=1e-5, atol=1e-4)


def test_every_device_gets_the_same_statistics(four_devices):
    x, _, params, state = _data(jnp.float32, offset=1e4)
    mask = _unequal_mask()

    @functools.partial(
        jax.shard_map,
        mesh=_mesh(four_devices),
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=P("data"),
        check_vma=False,
    )
    def per_device_stats(params, state, x, mask):
        _, new = jbn.bn_forward(params, state, x, True, axis_name="data", mask=mask, momentum=0.0)
        return jnp.stack([new["mean"], new["var"]])[None]

    stats = np.asarray(jax.jit(per_device_stats)(params, state, x, mask))
    assert stats.shape == (4, 2, 8)
    np.testing.assert_array_equal(stats, np.broadcast_to(stats[:1], stats.shape))


def test_vmap_and_two_mesh_axes_match_one_device(four_devices):
    """The all-gather also serves vmap's axis_name and a tuple of mesh axes."""
    x, _, params, state = _data(jnp.float32, offset=1e4)
    mask = _unequal_mask()
    one, _ = jbn.bn_forward(params, state, x, True, mask=mask)

    def per_device(x, mask, axis_name):
        return jbn.bn_forward(params, state, x, True, mask=mask, axis_name=axis_name)[0]

    mapped = jax.vmap(functools.partial(per_device, axis_name="i"), axis_name="i")
    y_vmap = mapped(x.reshape(4, 4, *SHAPE[1:]), mask.reshape(4, 4, 1, 1)).reshape(SHAPE)
    mesh = Mesh(np.array(four_devices).reshape(2, 2), ("a", "b"))
    y_mesh = jax.jit(
        jax.shard_map(
            functools.partial(per_device, axis_name=("a", "b")),
            mesh=mesh,
            in_specs=(P(("a", "b")), P(("a", "b"))),
            out_specs=P(("a", "b")),
        )
    )(x, mask)
    kept = np.broadcast_to(np.asarray(mask), SHAPE)
    for y in (y_vmap, y_mesh):
        np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(one)[kept], atol=2e-3)
