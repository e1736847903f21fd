"""The core's guards: non-finite data, padding whatever it holds, empty features and batches,
complex inputs, and the errors of inputs that cannot work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import batch_and_variables, random_variables
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from np_reference import np_forward, np_running

import jbn

SHAPE = (8, 3)


def _data(seed=0):
    return batch_and_variables(seed, SHAPE)


# --------------------------------------------------------------------------- #
# Non-finite batches never poison the running statistics (by default).
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_feature_keeps_its_running_stats(bad):
    x, params, state = _data()
    x = x.at[3, 1].set(bad)
    _, new = jax.jit(lambda x: jbn.bn_forward(params, state, x, True, momentum=0.9))(x)
    _, mean, var, _ = np_forward(np.asarray(x), params["scale"], params["bias"])
    want_mean, want_var = np_running(state["mean"], state["var"], mean, var, 0.9)
    for c in (0, 2):  # the finite features update as usual
        np.testing.assert_allclose(new["mean"][c], want_mean[c], rtol=1e-5)
        np.testing.assert_allclose(new["var"][c], want_var[c], rtol=1e-5)
    np.testing.assert_array_equal(new["mean"][1], state["mean"][1])
    np.testing.assert_array_equal(new["var"][1], state["var"][1])


def test_nonfinite_update_as_flax_when_asked():
    x, params, state = _data()
    x = x.at[0, 0].set(np.nan)
    _, new = jbn.bn_forward(params, state, x, True, finite_running_stats=False)
    assert np.isnan(new["mean"][0]) and np.isnan(new["var"][0])
    assert np.isfinite(new["mean"][1:]).all()
    with pytest.raises(TypeError, match="finite_running_stats must be a Python bool"):
        jbn.bn_forward(params, state, x, True, finite_running_stats="no")


# --------------------------------------------------------------------------- #
# Padding never reaches the gradient of counted entries, whatever it holds.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
@pytest.mark.parametrize("residual", ["input", "output"])
def test_padding_values_do_not_reach_counted_gradients(bad, residual):
    x, params, state = _data()
    mask = jnp.ones((SHAPE[0], 1), bool).at[0].set(False).at[5].set(False)
    w = jax.random.normal(jax.random.key(7), SHAPE)

    def loss(p, x):
        y, _ = jbn.bn_forward(p, state, x, True, mask=mask, residual=residual)
        return jnp.sum(jnp.where(mask, y, 0.0) * w)

    grad = jax.jit(jax.grad(loss, (0, 1)))
    clean = x.at[0].set(0.5).at[5].set(-2.0)  # any finite padding: the reference
    dirty = x.at[0].set(bad).at[5].set(bad)
    g_clean, g_dirty = grad(params, clean), grad(params, dirty)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(g_dirty[0][k], g_clean[0][k], rtol=1e-5, atol=1e-6)
    keep = np.asarray(mask[:, 0])
    np.testing.assert_allclose(g_dirty[1][keep], g_clean[1][keep], rtol=1e-5, atol=1e-6)
    # The padded positions' own dx is γ rstd dy = 0 here (their outputs are not used).
    np.testing.assert_array_equal(g_dirty[1][~keep], 0.0)


# --------------------------------------------------------------------------- #
# A feature with no counted value: x̂ = 0, so y = β; finite in float16; stats kept.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_feature_without_counted_values_outputs_bias(dtype):
    x, params, state = _data()
    x = (100.0 * x).astype(dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    state = jax.tree.map(lambda a: a.astype(dtype), state)
    mask = jnp.ones(SHAPE, bool).at[:, 1].set(False)

    def loss(p, x):
        y, new = jbn.bn_forward(p, state, x, True, mask=mask)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, new)

    (dp, dx), (y, new) = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(params, x)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    np.testing.assert_array_equal(y[:, 1], jnp.broadcast_to(params["bias"][1], (SHAPE[0],)))
    np.testing.assert_array_equal(new["mean"][1], state["mean"][1])
    np.testing.assert_array_equal(new["var"][1], state["var"][1])
    assert dx[:, 1].tolist() == [0.0] * SHAPE[0] and float(dp["scale"][1]) == 0.0
    np.testing.assert_allclose(
        float(dp["bias"][1]), np.sum(np.cos(np.asarray(y[:, 1], np.float64))), rtol=1e-2
    )
    # The other features are ordinary batch norm.
    y_np, *_ = np_forward(np.asarray(x, np.float32), params["scale"], params["bias"])
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(y, np.float64)[:, [0, 2]], y_np[:, [0, 2]], rtol=tol, atol=tol
    )


# --------------------------------------------------------------------------- #
# Empty batches and devices whose shard holds no counted example.
# --------------------------------------------------------------------------- #


def test_empty_batch_errors():
    params, state = jbn.bn_init(3)
    with pytest.raises(ValueError, match=r"bn_stats got x of shape \(0, 3\).*axis_name"):
        jbn.bn_stats(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        jbn.bn_forward(params, state, jnp.zeros((0, 3)), True)
    y, same = jbn.bn_forward(params, state, jnp.zeros((0, 3)), False)  # evaluation is fine
    assert y.shape == (0, 3) and same["mean"] is state["mean"]


def test_device_with_no_counted_example_matches_one_device(four_devices):
    x, params, state = _data()
    x = jnp.concatenate([x, x[::-1] + 1.0])  # 16 examples, 4 per device
    mask = jnp.ones((16, 1), bool).at[4:8].set(False)  # device 1 counts nothing
    w = jax.random.normal(jax.random.key(3), x.shape)

    def loss(p, x, mask, axis_name=None):
        y, new = jbn.bn_forward(p, state, x, True, mask=mask, axis_name=axis_name)
        return jnp.sum(jnp.sin(y) * w_local(axis_name)), (y, new)

    def w_local(axis_name):
        if axis_name is None:
            return w
        return jax.lax.dynamic_slice_in_dim(w, jax.lax.axis_index(axis_name) * 4, 4)

    mesh = Mesh(np.array(four_devices), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            lambda p, x, m: jax.grad(loss, (0, 1), has_aux=True)(p, x, m, "data"),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=((P(), P("data")), (P("data"), P())),
        )
    )
    (gp, gx), (y, new) = sharded(params, x, mask)
    (gp1, gx1), (y1, new1) = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(params, x, mask)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    jax.tree.map(close, (gp, gx, y, new), (gp1, gx1, y1, new1))
    assert np.isfinite(np.asarray(gx)).all()


def test_axis_index_groups_under_shard_map_says_why(four_devices):
    x, params, state = _data()
    mesh = Mesh(np.array(four_devices), ("data",))
    f = jax.shard_map(
        lambda x: jbn.bn_forward(
            params, state, x, True, axis_name="data", axis_index_groups=[[0, 1], [2, 3]]
        )[0],
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    with pytest.raises(NotImplementedError, match="pmap only.*shard_map"):
        f(jnp.concatenate([x, x]))


# --------------------------------------------------------------------------- #
# Complex inputs, as flax supports them.
# --------------------------------------------------------------------------- #


def _complex_reference(x, scale, bias, eps=1e-5):
    """Plain jnp: complex mean, real variance E|x - μ|², for JAX to differentiate."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.mean(jnp.abs(x - mean) ** 2, axis=0, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale[None] + bias[None], mean, var


def test_complex_forward_running_stats_and_gradients():
    k = jax.random.split(jax.random.key(0), 3)
    x = (1.0 + 2j) + jax.random.normal(k[0], (16, 3), jnp.complex64)
    params, state = random_variables(k[1], (3,))
    w = jax.random.normal(k[2], (16, 3), jnp.complex64)
    y, new = jbn.bn_forward(params, state, x, True, momentum=0.9)
    x64 = np.asarray(x, np.complex128)
    mean = x64.mean(0)
    var = (np.abs(x64 - mean) ** 2).mean(0)
    y_np = (x64 - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"]) + np.asarray(
        params["bias"]
    )
    assert y.dtype == jnp.complex64 and new["var"].dtype == jnp.float32
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], 0.9 * state["mean"] + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * state["var"] + 0.1 * var, rtol=1e-5)
    # Evaluation with the complex running mean and real variance.
    y_eval, _ = jbn.bn_forward(params, new, x, False)
    want = (x64 - np.asarray(new["mean"])) / np.sqrt(np.asarray(new["var"]) + 1e-5)
    np.testing.assert_allclose(
        y_eval,
        want * np.asarray(params["scale"]) + np.asarray(params["bias"]),
        rtol=1e-5,
        atol=1e-5,
    )
    # Gradients (real loss) against JAX's own differentiation of a plain formula.
    loss = lambda f: lambda p, x: jnp.sum(jnp.real(jnp.conj(w) * f(p, x)))  # noqa: E731
    ours = loss(lambda p, x: jbn.bn_forward(p, state, x, True)[0])
    ref = loss(lambda p, x: _complex_reference(x, p["scale"], p["bias"])[0])
    g, g_ref = jax.grad(ours, (0, 1))(params, x), jax.grad(ref, (0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)
    m, v, n = jbn.bn_stats(x)
    np.testing.assert_allclose(m, mean, rtol=1e-5)
    np.testing.assert_allclose(v, var, rtol=1e-5)
    assert v.dtype == jnp.float32 and n.dtype == jnp.float32


def test_hessian_works_without_autodiff():
    # Forward over reverse (jax.hessian) passes the custom_vjp's backward, itself jnp.
    x, params, state = _data()
    f = lambda x, ad: jnp.sum(jnp.sin(jbn.bn_forward(params, state, x, True, autodiff=ad)[0]))  # noqa: E731
    h = jax.jit(jax.hessian(f), static_argnums=1)
    np.testing.assert_allclose(h(x, False), h(x, True), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: f(x, False), (x,), (x,))


def test_integer_and_bool_inputs_compute_in_float32():
    """flax's rule: an integer or bool x is promoted to float32 (issue 26, item 3)."""
    params, state = jbn.bn_init(3)
    xi = jnp.arange(24, dtype=jnp.int32).reshape(8, 3) % 5
    xf = xi.astype(jnp.float32)
    for kwargs in (dict(train=True), dict(train=False), dict(train=False, prior=4.0)):
        yi, si = jbn.bn_forward(params, state, xi, **kwargs)
        yf, sf = jbn.bn_forward(params, state, xf, **kwargs)
        assert yi.dtype == jnp.float32
        np.testing.assert_array_equal(yi, yf)
        jax.tree.map(np.testing.assert_array_equal, si, sf)
    y16, _ = jbn.bn_forward(params, state, xi, True, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    for a, b in zip(jbn.bn_stats(xi), jbn.bn_stats(xf), strict=True):
        np.testing.assert_array_equal(a, b)
    # A bool x computes as its 0/1 values: against the float64 reference, dense and NHWC.
    for shape in ((8, 3), (2, 4, 2, 3)):
        xb = jnp.arange(np.prod(shape)).reshape(shape) % 5 > 2
        yb, sb = jbn.bn_forward(params, state, xb, True, momentum=0.9)
        assert yb.dtype == jnp.float32
        want, mean, var, _ = np_forward(np.asarray(xb, np.float64), np.ones(3), np.zeros(3))
        np.testing.assert_allclose(yb, want, rtol=1e-5, atol=1e-5)
        want_mean, want_var = np_running(state["mean"], state["var"], mean, var, 0.9)
        np.testing.assert_allclose(sb["mean"], want_mean, rtol=1e-6)
        np.testing.assert_allclose(sb["var"], want_var, rtol=1e-6)
    x64 = np.asarray(xf, np.float64)  # the float64 NumPy reference of the formula
    want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(jbn.bn_forward(params, state, xi, True)[0], want, rtol=1e-5)
