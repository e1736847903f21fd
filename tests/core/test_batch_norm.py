"""The functional core against NumPy float64 transcriptions and JAX autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import feature_shape, random_variables
from jax import lax
from jax.test_util import check_grads
from np_reference import np_backward, np_eval, np_forward, np_running, np_stats

import jbn

# (shape, axis): (N, C), NHWC, NCHW, per-activation NHWC, (N, T, C).
LAYOUTS = {
    "NC": ((16, 5), -1),
    "NHWC": ((4, 3, 5, 6), -1),
    "NCHW": ((4, 6, 3, 5), 1),
    "per_activation": ((6, 3, 2, 4), (1, 2, 3)),
    "NTC": ((3, 7, 5), -1),
}


def make(shape, axis, dtype=jnp.float32, seed=0, offset=0.0):
    """Random x and non-trivial params/state for a layout."""
    kx, kv = jax.random.split(jax.random.key(seed))
    x = (offset + 2.0 * jax.random.normal(kx, shape) + 0.5).astype(dtype)
    params, state = random_variables(kv, feature_shape(shape, axis), dtype)
    return x, params, state


def loss_fn(params, x, state, *, weights, **kw):
    y, _ = jbn.bn_forward(params, state, x, True, **kw)
    # A non-trivial cotangent: a weighted sum plus a nonlinearity.
    return jnp.sum(y * weights) + jnp.sum(jnp.sin(y))


# --------------------------------------------------------------------------- #
# Forward, running statistics and eval mode against NumPy.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_forward_and_running_stats_match_numpy(layout):
    shape, axis = LAYOUTS[layout]
    x, params, state = make(shape, axis)
    y, new = jax.jit(functools.partial(jbn.bn_forward, train=True, axis=axis, momentum=0.9))(
        params, state, x
    )
    y_np, mean_np, var_np, _ = np_forward(x, params["scale"], params["bias"], axis)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    rm, rv = np_running(state["mean"], state["var"], mean_np, var_np, 0.9)
    np.testing.assert_allclose(new["mean"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], rv, rtol=1e-5, atol=1e-6)
    assert y.dtype == jnp.float32 and y.shape == shape
    assert new["mean"].shape == feature_shape(shape, axis)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_uses_running_stats_and_keeps_state(layout):
    shape, axis = LAYOUTS[layout]
    x, params, state = make(shape, axis)
    y, new = jbn.bn_forward(params, state, x, False, axis=axis, epsilon=1e-3)
    y_np = np_eval(x, params["scale"], params["bias"], state["mean"], state["var"], axis, eps=1e-3)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    for k in state:
        np.testing.assert_array_equal(new[k], state[k])


def test_first_step_from_init_follows_closed_form():
    # flax's linen_test: after one step from zeros, mean = (1 - momentum) * batch mean.
    x = jax.random.normal(jax.random.key(1), (32, 3)) * 3 + 2
    params, state = jbn.bn_init(3)
    y, new = jbn.bn_forward(params, state, x, True, momentum=0.9)
    np.testing.assert_allclose(new["mean"], 0.1 * np.mean(np.asarray(x, np.float64), 0), rtol=1e-5)
    np.testing.assert_allclose(
        new["var"], 0.9 + 0.1 * np.var(np.asarray(x, np.float64), 0), rtol=1e-5
    )
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(0), 1, rtol=1e-3)  # var/(var + eps)


def test_bn_stats_matches_numpy():
    shape, axis = LAYOUTS["NCHW"]
    x, _, _ = make(shape, axis, offset=50.0)
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, shape)
    mean, var, n = jbn.bn_stats(x, axis=axis, mask=mask)
    m_np, v_np, n_np = np_stats(x, axis, mask)
    np.testing.assert_allclose(mean, m_np.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(var, v_np.reshape(-1), rtol=1e-4)
    np.testing.assert_array_equal(n, n_np.reshape(-1))


# --------------------------------------------------------------------------- #
# Numerics.
# --------------------------------------------------------------------------- #


def test_variance_is_exact_with_a_large_mean():
    # flax.linen.BatchNorm's default (E[x²] - E[x]²) gives std ~300 here.
    x = 1e4 + jax.random.normal(jax.random.key(0), (1024, 16), jnp.float32)
    params, state = jbn.bn_init(16)
    y, new = jax.jit(functools.partial(jbn.bn_forward, train=True))(params, state, x)
    assert np.all(np.abs(np.std(np.asarray(y, np.float64), axis=0) - 1) < 1e-3)
    _, var_np, _ = np_stats(x)
    np.testing.assert_allclose((new["var"] - 0.99) / 0.01, var_np.reshape(-1), rtol=1e-3)


def test_variance_is_exact_with_a_large_mean_under_a_mask():
    x = 1e4 + jax.random.normal(jax.random.key(0), (256, 4, 8), jnp.float32)
    # The first example is all padding: the shift must not come from it.
    mask = jnp.ones((256, 4, 1), bool).at[0].set(False).at[5:40].set(False)
    y, _ = jbn.bn_forward(None, jbn.bn_init(8)[1], x, True, mask=mask)
    kept = np.asarray(y, np.float64)[np.asarray(mask[..., 0])]
    assert np.all(np.abs(kept.std(axis=0) - 1) < 1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32(dtype):
    shape, axis = LAYOUTS["NHWC"]
    x, params, state = make(shape, axis, dtype=dtype, offset=100.0)
    y, new = jbn.bn_forward(params, state, x, True, axis=axis)
    assert y.dtype == dtype and new["mean"].dtype == dtype
    # The same math on the exactly-upcast input: only the final rounding differs.
    up = jax.tree.map(lambda a: a.astype(jnp.float32), (params, state, x))
    y32, _ = jbn.bn_forward(*up[:2], up[2], True, axis=axis)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=1e-2, atol=1e-2)
    y_np, _, _, _ = np_forward(x.astype(jnp.float32), params["scale"], params["bias"], axis)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_np, rtol=2e-2, atol=2e-2)
    # dtype= overrides the output dtype; gradients come back in each input's dtype.
    y_f32, _ = jbn.bn_forward(params, state, x, True, axis=axis, dtype=jnp.float32)
    assert y_f32.dtype == jnp.float32
    g = jax.grad(
        lambda p, x: jnp.sum(
            jbn.bn_forward(p, state, x, True, axis=axis)[0].astype(jnp.float32) ** 2
        ),
        (0, 1),
    )(params, x)
    assert g[0]["scale"].dtype == dtype and g[1].dtype == dtype


def test_mixed_param_dtype():
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.bfloat16)
    params, state = jbn.bn_init(3, dtype=jnp.float32)
    y, new = jbn.bn_forward(params, state, x, True)
    g = jax.grad(lambda p: jnp.sum(jbn.bn_forward(p, state, x, True)[0].astype(jnp.float32)))(
        params
    )
    assert (
        y.dtype == jnp.bfloat16
        and new["var"].dtype == jnp.float32
        and g["scale"].dtype == jnp.float32
    )


@pytest.mark.parametrize("residual", ["input", "output"])
def test_constant_feature_is_finite(residual):
    x = jnp.stack([jnp.full((16,), 3.0), jnp.arange(16.0)], axis=1)
    params, state = jbn.bn_init(2)
    y, new = jbn.bn_forward(params, state, x, True, residual=residual)
    np.testing.assert_allclose(y[:, 0], 0.0)
    g = jax.grad(
        lambda p, x: jnp.sum(jbn.bn_forward(p, state, x, True, residual=residual)[0] ** 2), (0, 1)
    )(params, x)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((y, new, g)))
    np.testing.assert_allclose(g[1][:, 0], 0.0)


# --------------------------------------------------------------------------- #
# Gradients.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", ["input", "output"])
def test_gradient_matches_closed_form_float64(layout, residual):
    shape, axis = LAYOUTS[layout]
    with jax.enable_x64():
        x, params, state = make(shape, axis, dtype=jnp.float64)
        dy = jax.random.normal(jax.random.key(7), shape, jnp.float64)
        y, vjp = jax.vjp(
            lambda p, x: jbn.bn_forward(p, state, x, True, axis=axis, residual=residual)[0],
            params,
            x,
        )
        dp, dx = vjp(dy)
        dx_np, ds_np, db_np = np_backward(x, params["scale"], dy, axis)
        np.testing.assert_allclose(dx, dx_np, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dp["scale"], ds_np, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dp["bias"], db_np, rtol=1e-10, atol=1e-12)


GRAD_CASES = {
    "NHWC": dict(layout="NHWC"),
    "NCHW_mask": dict(layout="NCHW", mask=True),
    "per_activation": dict(layout="per_activation"),
    "NC_output_residual": dict(layout="NC", residual="output"),
    "NTC_mask_output": dict(layout="NTC", mask=True, residual="output"),
    "no_affine": dict(layout="NC", no_affine=True),
}


def _grad_case(case, dtype):
    c = GRAD_CASES[case]
    shape, axis = LAYOUTS[c["layout"]]
    x, params, state = make(shape, axis, dtype=dtype)
    kw = dict(axis=axis, residual=c.get("residual", "input"))
    if c.get("mask"):
        kw["mask"] = jax.random.bernoulli(jax.random.key(11), 0.6, shape)
    if c.get("no_affine"):
        params = {}
    weights = jax.random.normal(jax.random.key(5), shape, dtype)
    return params, x, state, weights, kw


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradient_matches_autodiff_reference(case):
    with jax.enable_x64():
        params, x, state, weights, kw = _grad_case(case, jnp.float64)
        g = jax.grad(loss_fn, (0, 1))(params, x, state, weights=weights, **kw)
        g_ref = jax.grad(loss_fn, (0, 1))(params, x, state, weights=weights, autodiff=True, **kw)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10), g, g_ref
        )
    params, x, state, weights, kw = _grad_case(case, jnp.float32)
    g = jax.jit(jax.grad(functools.partial(loss_fn, **kw), (0, 1)))(
        params, x, state, weights=weights
    )
    g_ref = jax.grad(loss_fn, (0, 1))(params, x, state, weights=weights, autodiff=True, **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g, g_ref)


@pytest.mark.parametrize("case", ["NHWC", "NCHW_mask", "NC_output_residual"])
def test_check_grads_second_order(case):
    with jax.enable_x64():
        params, x, state, weights, kw = _grad_case(case, jnp.float64)
        f = lambda scale, bias, x: loss_fn(
            {"scale": scale, "bias": bias}, x, state, weights=weights, **kw
        )  # noqa: E731
        check_grads(
            f, (params["scale"], params["bias"], x), order=2, modes=["rev"], atol=1e-6, rtol=1e-6
        )


def test_grad_of_grad_matches_reference():
    with jax.enable_x64():
        params, x, state, weights, kw = _grad_case("NCHW_mask", jnp.float64)

        def hvp(autodiff):
            gx = lambda x: jax.grad(loss_fn, 1)(
                params, x, state, weights=weights, autodiff=autodiff, **kw
            )  # noqa: E731
            return jax.vjp(gx, x)[1](weights)[0]

        np.testing.assert_allclose(hvp(False), hvp(True), rtol=1e-9, atol=1e-10)


def test_eval_gradient_is_the_affine_map():
    shape, axis = LAYOUTS["NHWC"]
    x, params, state = make(shape, axis)
    (gp, gx, gs) = jax.grad(
        lambda p, x, s: jnp.sum(jbn.bn_forward(p, s, x, False)[0] * 2.0), (0, 1, 2)
    )(params, x, state)
    rstd = 1 / np.sqrt(np.asarray(state["var"], np.float64) + 1e-5)
    np.testing.assert_allclose(gx, np.broadcast_to(2 * params["scale"] * rstd, shape), rtol=1e-6)
    np.testing.assert_allclose(gp["bias"], np.full(6, 2.0 * 4 * 3 * 5), rtol=1e-6)
    # The running statistics carry no gradient, in either mode.
    np.testing.assert_array_equal(gs["mean"], 0)
    np.testing.assert_array_equal(gs["var"], 0)
    gs_train = jax.grad(lambda s: jnp.sum(jbn.bn_forward(params, s, x, True)[1]["mean"]))(state)
    np.testing.assert_array_equal(gs_train["mean"], 0)


def test_forward_mode_needs_autodiff_switch():
    shape, axis = LAYOUTS["NC"]
    x, params, state = make(shape, axis)
    f = lambda autodiff: lambda x: jbn.bn_forward(params, state, x, True, autodiff=autodiff)[0]  # noqa: E731
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f(False), (x,), (jnp.ones_like(x),))
    # With autodiff=True, forward mode works and agrees with reverse mode.
    jac_fwd = jax.jacfwd(f(True))(x[:4])
    jac_rev = jax.jacrev(f(False))(x[:4])
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- #
# Residual memory.
# --------------------------------------------------------------------------- #


def residual_bytes(f, *args):
    _, vjp = jax.vjp(f, *args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_residuals_are_the_input_plus_per_feature_vectors(dtype):
    shape, axis = (64, 8, 8, 32), -1
    x, params, state = make(shape, axis, dtype=dtype)
    per_feature = 16 * 32 * 4  # a handful of float32 vectors of the features
    f = lambda p, x: jbn.bn_forward(p, state, x, True)[0]  # noqa: E731
    assert residual_bytes(f, params, x) <= x.nbytes + per_feature
    # With residual="output", y itself is the only array-sized residual.
    g = lambda p, x: jbn.bn_forward(p, state, x, True, residual="output")[0]  # noqa: E731
    y = g(params, x)
    assert residual_bytes(g, params, x) - y.nbytes <= per_feature
    # Autodiff of the reference keeps several input-sized arrays.
    h = lambda p, x: jbn.bn_forward(p, state, x, True, autodiff=True)[0]  # noqa: E731
    assert residual_bytes(h, params, x) >= 2 * x.nbytes


def test_output_residual_with_scale_near_zero():
    shape, axis = LAYOUTS["NC"]
    x, params, state = make(shape, axis)
    params["scale"] = params["scale"].at[0].set(0.0).at[1].set(-1e-6).at[2].set(2e-3)
    y, _ = jbn.bn_forward(params, state, x, True, residual="output")
    y_np, _, _, _ = np_forward(
        x, np.array([1e-3, -1e-3, 2e-3, *params["scale"][3:]]), params["bias"]
    )
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-6)
    w = jax.random.normal(jax.random.key(2), shape)
    g = jax.grad(loss_fn, (0, 1))(params, x, state, weights=w, residual="output")
    g_ref = jax.grad(loss_fn, (0, 1))(params, x, state, weights=w, residual="output", autodiff=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g, g_ref)
    assert (
        np.all(np.isfinite(g[1])) and g[0]["scale"][0] != 0
    )  # straight-through: γ = 0 still learns


# --------------------------------------------------------------------------- #
# Running-statistics conventions.
# --------------------------------------------------------------------------- #


def test_cumulative_average_is_the_mean_of_batch_stats():
    params, state = jbn.bn_init(4, cumulative=True)
    xs = jax.random.normal(jax.random.key(0), (5, 10, 4)) * jnp.arange(1.0, 6.0)[:, None, None] + 3
    for x in xs:
        _, state = jbn.bn_forward(params, state, x, True, momentum=None)
    x64 = np.asarray(xs, np.float64)
    np.testing.assert_allclose(state["mean"], x64.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(state["var"], x64.var(axis=1).mean(axis=0), rtol=1e-5)
    assert state["count"].shape == (4,) and (state["count"] == 5).all()


def test_unbiased_running_var_follows_torch():
    x = jax.random.normal(jax.random.key(0), (6, 3, 2, 2)) * 2 + 1
    params, state = jbn.bn_init(3)
    y, new = jbn.bn_forward(params, state, x, True, axis=1, momentum=0.9, unbiased_running_var=True)
    x64 = np.asarray(x, np.float64)
    # torch: running_var = (1 - m) * running_var + m * var_unbiased, m = 0.1, n = 6*2*2.
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * x64.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    # ...while the output uses the biased batch variance.
    y_np, _, _, _ = np_forward(x, np.ones(3), np.zeros(3), 1)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)


def test_unbiased_running_var_matches_torch_if_installed():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32) * 3 + 2
    bn = torch.nn.BatchNorm2d(3, momentum=0.1)
    out = bn(torch.from_numpy(x)).detach().numpy()
    params, state = jbn.bn_init(3)
    y, new = jbn.bn_forward(params, state, x, True, axis=1, momentum=0.9, unbiased_running_var=True)
    np.testing.assert_allclose(y, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(new["var"], bn.running_var.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- #
# Masks.
# --------------------------------------------------------------------------- #


def test_mask_equals_dropping_the_padded_rows():
    x, params, state = make((12, 5), -1)
    keep = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], bool)
    mask = jnp.asarray(keep)[:, None]
    w = jax.random.normal(jax.random.key(4), x.shape)

    def run(x, w, mask):
        def f(p, x):
            y, s = jbn.bn_forward(p, state, x, True, mask=mask, momentum=0.8)
            return jnp.sum(jnp.where(True if mask is None else mask, y * w, 0)), (y, s)

        return jax.grad(f, (0, 1), has_aux=True)(params, x)

    (gp, gx), (y, s) = run(x, w, mask)
    (gp_c, gx_c), (y_c, s_c) = run(x[keep], w[keep], None)
    np.testing.assert_allclose(y[keep], y_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx[keep], gx_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gx[~keep], 0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), (gp, s), (gp_c, s_c)
    )


def test_fully_masked_feature_keeps_running_stats():
    x, params, state = make((8, 3), -1)
    mask = jnp.ones((8, 3), bool).at[:, 1].set(False)
    y, new = jbn.bn_forward(params, state, x, True, mask=mask)
    np.testing.assert_array_equal(new["mean"][1], state["mean"][1])
    np.testing.assert_array_equal(new["var"][1], state["var"][1])
    assert np.all(np.isfinite(y))


# --------------------------------------------------------------------------- #
# Transformations.
# --------------------------------------------------------------------------- #


def test_vmap_without_axis_name_is_independent_per_instance():
    x, params, state = make((3, 8, 4), -1)
    f = lambda x: jbn.bn_forward(params, state, x, True)  # noqa: E731
    y, new = jax.vmap(f)(x)
    for i in range(3):
        y_i, new_i = f(x[i])
        np.testing.assert_allclose(y[i], y_i, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new["var"][i], new_i["var"], rtol=1e-6)


def test_vmap_with_axis_name_equals_the_whole_batch():
    x, params, state = make((4, 6, 5), -1)
    mask = jax.random.bernoulli(jax.random.key(9), 0.7, (4, 6, 1))
    w = jax.random.normal(jax.random.key(3), x.shape)

    def loss(p, x, m, axis_name):
        y, s = jbn.bn_forward(p, state, x, True, mask=m, axis_name=axis_name)
        return jnp.sum(jnp.sin(y) * w.reshape(y.shape)), (y, s)

    def per_device(p, x, m, w_i):
        def f(p, x):
            y, s = jbn.bn_forward(p, state, x, True, mask=m, axis_name="batch")
            return jnp.sum(jnp.sin(y) * w_i), (y, s)

        return jax.grad(f, (0, 1), has_aux=True)(p, x)

    (gp, gx), (y, s) = jax.vmap(per_device, in_axes=(None, 0, 0, 0), axis_name="batch")(
        params, x, mask, w
    )
    (gp1, gx1), (y1, s1) = jax.grad(loss, (0, 1), has_aux=True)(
        params, x.reshape(24, 5), mask.reshape(24, 1), None
    )
    np.testing.assert_allclose(y.reshape(24, 5), y1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx.reshape(24, 5), gx1, rtol=1e-5, atol=1e-6)
    # Each instance sees the shared statistics and holds its own parameter gradient.
    for k in s1:
        np.testing.assert_allclose(s[k], np.broadcast_to(s1[k], s[k].shape), rtol=1e-5)
    np.testing.assert_allclose(gp["scale"].sum(0), gp1["scale"], rtol=1e-5, atol=1e-5)


def test_scan_over_training_steps_carries_state():
    xs = jax.random.normal(jax.random.key(0), (6, 16, 3)) * 2 + 1
    params, state = jbn.bn_init(3, cumulative=True)

    def step(carry, x):
        p, s = carry
        g, s = jax.grad(
            lambda p: (lambda y, s: (jnp.sum(y**3), s))(
                *jbn.bn_forward(p, s, x, True, momentum=None)
            ),
            has_aux=True,
        )(p)
        p = jax.tree.map(lambda a, b: a - 0.01 * b, p, g)
        return (p, s), None

    (p_scan, s_scan), _ = jax.jit(lambda c, xs: lax.scan(step, c, xs))((params, state), xs)
    carry = (params, state)
    for x in xs:
        carry, _ = step(carry, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), (p_scan, s_scan), carry
    )
    assert s_scan["count"].shape == state["count"].shape and (s_scan["count"] == 6).all()


# --------------------------------------------------------------------------- #
# Bad input: one clear error each.
# --------------------------------------------------------------------------- #


def _bad(**overrides):
    x, params, state = make((4, 3), -1)
    args = dict(params=params, state=state, x=x, train=True)
    args.update(overrides)
    kw = {k: args.pop(k) for k in list(args) if k not in ("params", "state", "x", "train")}
    return lambda: jbn.bn_forward(args["params"], args["state"], args["x"], args["train"], **kw)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(x=jnp.ones((1, 3))), ValueError, r"more than 1 value per feature.*\(1, 3\)"),
        (dict(x=jnp.ones((1, 3, 1)), axis=1), ValueError, "more than 1 value per feature"),
        (
            dict(params={"scale": jnp.ones(4)}),
            ValueError,
            r"params\['scale'\] has shape \(4,\).*\(4, 3\).*\(3,\)",
        ),
        (
            dict(params={"bias": jnp.ones((3, 1))}),
            ValueError,
            r"params\['bias'\] has shape \(3, 1\)",
        ),
        (dict(params={"weight": jnp.ones(3)}), ValueError, "unknown keys.*weight"),
        (dict(params=[jnp.ones(3)]), TypeError, "params must be a dict"),
        (
            dict(state={"mean": jnp.zeros(3), "var": jnp.ones(2)}),
            ValueError,
            r"state\['var'\] has shape \(2,\)",
        ),
        (dict(state={"mean": jnp.zeros(3)}), ValueError, "state is missing 'var'"),
        (dict(momentum=None), ValueError, r"momentum=None.*count.*cumulative=True"),
        (dict(axis=2), ValueError, r"axis 2 is out of range for x of shape \(4, 3\)"),
        (dict(axis=(1, -1)), ValueError, "repeats an axis"),
        (dict(axis=(0, 1)), ValueError, "names every axis"),
        (dict(axis=1.0), TypeError, "axis must be an int"),
        (dict(residual="x"), ValueError, r"residual must be 'input' or 'output', got 'x'"),
        (dict(momentum=1.5), ValueError, r"momentum must be >= 0\.0 and <= 1\.0, got 1\.5"),
        (dict(momentum=-0.1), ValueError, r"momentum must be >= 0\.0 and <= 1\.0, got -0\.1"),
        (dict(epsilon=0.0), ValueError, r"epsilon must be > 0\.0, got 0\.0"),
        (
            dict(epsilon=jnp.float32(1e-5) * jnp.ones(())),
            TypeError,
            "epsilon must be a Python float",
        ),
        (dict(train=jnp.array(True)), TypeError, "train must be a Python bool"),
        (
            dict(mask=jnp.ones((4, 2), bool)),
            ValueError,
            r"mask of shape \(4, 2\) does not broadcast to x of shape \(4, 3\)",
        ),
        (dict(mask=jnp.ones((4, 3))), TypeError, "mask must be boolean"),
        (dict(dtype=jnp.int32), TypeError, "dtype must be a floating-point dtype"),
        (dict(axis_name="batch"), ValueError, "axis_name='batch' is not bound"),
        (dict(axis_index_groups=[[0, 1]]), ValueError, "axis_index_groups needs axis_name"),
        (dict(min_scale=-1.0), ValueError, r"min_scale must be > 0\.0, got -1\.0"),
    ],
)
def test_bad_input_raises_one_clear_error(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad(**overrides)()


def test_bad_input_errors_are_raised_under_jit():
    x, params, state = make((4, 3), -1)
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(2,\)"):
        jax.jit(lambda p, x: jbn.bn_forward(p, state, x, True))({"scale": jnp.ones(2)}, x)


def test_bn_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="feature_shape must be a positive int"):
        jbn.bn_init((3, 0))
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        jbn.bn_init(3, dtype=jnp.int32)


def test_internal_config_is_hashable():
    # Static settings are nondiff_argnums of the custom_vjp: they must hash.
    import dataclasses

    from jbn._batch_norm import _stats_config, _train_config

    x = jnp.ones((4, 3))
    stats, _ = _stats_config(x, -1, None, None)
    cfg = _train_config(x, stats, epsilon=1e-5, residual="input", min_scale=1e-3, dtype=None)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
