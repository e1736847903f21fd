"""Psums whose size does not grow with the devices, exact whatever each device holds.

A ``shard_map``'d layer over 4 CPU devices: the compiled forward holds two
all-reduces of per-feature sums, the second in a conditional (it runs only when
the running mean is far from the batch mean), the forward + backward three (the
backward's one all-reduce of Σdy and Σdy x̂, which the parameter cotangents
reuse), and no all-gather. The statistics are exact at a large offset with
unequal masked counts (against NumPy float64), from a fresh and from a warm
state, and every device gets the same bits.
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
def test_two_all_reduces_in_the_forward_three_with_the_backward(four_devices, dtype, masked):
    x, w, params, state = _data(dtype)
    mask = _unequal_mask() if masked else None
    layer = _layer(_mesh(four_devices), masked)

    def loss(params, x):
        y, _ = layer(params, state, x, mask)
        return jnp.vdot(y.astype(jnp.float32), w.astype(jnp.float32))

    forward = jax.jit(layer).lower(params, state, x, mask).compile()
    both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    assert _collectives(forward) == ["all-reduce", "all-reduce"]
    assert _collectives(both) == ["all-reduce"] * 3
    assert forward.as_text().count(" conditional(") == 1


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


def _start(kind: str, x: jax.Array) -> tuple[dict[str, jax.Array], P]:
    """A state to start from, and its in_spec: a fresh one, a warm one (near the
    batch mean: one round of psums), one that differs on every device (not the
    same everywhere: JAX's types say so, and it is not used), one not finite."""
    mean = np.mean(np.asarray(x, np.float64).reshape(-1, 8), axis=0)
    if kind == "fresh":
        return jbn.bn_init(8)[1], P()
    if kind == "warm":
        return {"mean": jnp.asarray(mean + 0.25, jnp.float32), "var": jnp.ones(8)}, P()
    if kind == "per_device":
        means = mean + 3.0 * np.arange(4)[:, None]  # device i: 3i std away
        return {"mean": jnp.asarray(means, jnp.float32), "var": jnp.ones((4, 8))}, P("data")
    assert kind == "not_finite"
    bad = np.where(np.arange(8) % 2, np.nan, np.inf) * np.sign(np.arange(8) - 3.5)
    return {"mean": jnp.asarray(bad, jnp.float32), "var": jnp.ones(8)}, P()


@pytest.mark.parametrize("start", ["fresh", "warm", "per_device", "not_finite"])
@pytest.mark.parametrize("shape", [(16, 8), (16, 2, 3, 8)], ids=["dense", "nhwc"])
def test_exact_from_any_running_mean(four_devices, shape, start):
    """The psummed statistics are exact whatever the running mean about which they
    are summed (fresh at 0, warm, different per device, not finite), at 1e4 + N(0, 1)
    with unequal masked counts, against NumPy float64."""
    kx, kw = jax.random.split(jax.random.key(1))
    x = 1e4 + jax.random.normal(kx, shape)
    w = jax.random.normal(kw, shape)
    mask = _unequal_mask().reshape((16,) + (1,) * (len(shape) - 1))
    params = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1.0, 1.0, 8)}
    state, state_spec = _start(start, x)

    def per_device(params, state, x, mask, w):
        state = jax.tree.map(lambda v: v.reshape(8), state)

        def loss(params, x):
            y, new = jbn.bn_forward(
                params, state, x, True, axis_name="data", mask=mask, momentum=0.0
            )
            return jnp.vdot(y, w), (y, new)

        (gp, gx), (y, new) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return gp, gx, y, jax.tree.map(lambda v: v[None], new)

    data = P("data")
    step = jax.jit(
        jax.shard_map(
            per_device,
            mesh=_mesh(four_devices),
            in_specs=(P(), state_spec, data, data, data),
            out_specs=(P(), data, data, data),
        )
    )
    gp, gx, y, new = step(params, state, x, mask, w)
    y_np, mean_np, var_np, _ = np_forward(x, params["scale"], params["bias"], mask=mask)
    dx_np, dscale_np, dbias_np = np_backward(x, params["scale"], w, mask=mask)
    kept = np.broadcast_to(np.asarray(mask), shape)
    np.testing.assert_allclose(np.asarray(y)[kept], y_np[kept], atol=1e-4)
    np.testing.assert_allclose(gx, dx_np, atol=1e-4)
    np.testing.assert_allclose(gp["scale"], dscale_np, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gp["bias"], dbias_np, rtol=1e-5, atol=1e-4)
    if start != "not_finite":  # 0 * (a non-finite running mean) is not finite
        for name, want in (("mean", mean_np), ("var", var_np)):
            got = np.asarray(new[name])  # one row per device, each the batch's statistics
            np.testing.assert_array_equal(got, np.broadcast_to(got[:1], got.shape))
            np.testing.assert_allclose(got[0], want, rtol=1e-7 if name == "mean" else 1e-5)


def test_a_second_round_only_far_from_the_running_mean(four_devices):
    """Summed about a running mean near the batch mean, the statistics come back
    about it (one round); about one far away (a fresh state at 1e4), about the
    first round's mean instead (the second round ran)."""
    from jbn._stats import StatsConfig, shifted_stats

    x = 1e4 + jax.random.normal(jax.random.key(2), (16, 8))
    mean = np.mean(np.asarray(x, np.float64), axis=0)
    near = jnp.asarray(mean - 0.5, jnp.float32)
    cfg = StatsConfig((0,), "data")
    stats = jax.jit(
        jax.shard_map(
            lambda x, center: shifted_stats(x, None, cfg, center[None])[:2],
            mesh=_mesh(four_devices),
            in_specs=(P("data"), P()),
            out_specs=P(),
        )
    )
    shift, dmean = stats(x, near)
    np.testing.assert_array_equal(shift[0], near)
    np.testing.assert_allclose(dmean[0], mean - np.asarray(near, np.float64), rtol=1e-6)
    shift, dmean = stats(x, jnp.zeros(8))
    assert np.all(np.abs(shift[0] - 1e4) < 1)  # the second round's shift: the mean
    assert np.all(np.abs(dmean[0]) < 1e-2)


def test_pmap_groups_with_states_that_differ_per_device(four_devices):
    """Under pmap (no types to prove a state the same everywhere) each device's own
    running mean, here different on every device, must not enter the sums: each
    group of axis_index_groups gets its own exact statistics at 1e4 + N(0, 1)."""
    x = 1e4 + jax.random.normal(jax.random.key(3), (4, 4, 2, 8))  # (device, N, H, C)
    params = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1.0, 1.0, 8)}
    states = {"mean": 1e4 + jnp.repeat(jnp.arange(4.0)[:, None], 8, 1), "var": jnp.ones((4, 8))}

    def per_device(x, state):
        return jbn.bn_forward(
            params, state, x, True, axis_name="d", axis_index_groups=[[0, 1], [2, 3]]
        )[0]

    y = jax.pmap(per_device, axis_name="d", devices=four_devices)(x, states)
    for group in ([0, 1], [2, 3]):
        batch = np.asarray(x)[group].reshape(8, 2, 8)
        y_np = np_forward(batch, params["scale"], params["bias"])[0]
        np.testing.assert_allclose(np.asarray(y)[group].reshape(8, 2, 8), y_np, atol=1e-4)


def test_a_constant_feature_next_to_its_running_mean_takes_one_round(four_devices):
    """A feature that is constant in the batch, its running mean an ulp away (EMA
    rounding), is not "far": one round, and its variance is 0, its mean exact."""
    from jbn._stats import StatsConfig, shifted_stats

    x = jnp.concatenate([jnp.ones((16, 1)), jax.random.normal(jax.random.key(4), (16, 7))], 1)
    center = jnp.concatenate([jnp.asarray([np.nextafter(np.float32(1), 0)]), jnp.zeros(7)])
    cfg = StatsConfig((0,), "data")
    shift, dmean, var, _ = jax.jit(
        jax.shard_map(
            lambda x, center: shifted_stats(x, None, cfg, center[None]),
            mesh=_mesh(four_devices),
            in_specs=(P("data"), P()),
            out_specs=P(),
        )
    )(x, center)
    np.testing.assert_array_equal(shift[0], center)  # the running mean: one round
    assert float(shift[0, 0]) + float(dmean[0, 0]) == 1.0
    assert float(var[0, 0]) == 0.0
