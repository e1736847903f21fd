"""Ghost batch norm and batch renormalization in the core (jbn.bn_forward's
virtual_batch_size and renorm).

References are independent of jbn: NumPy float64 transcriptions per ghost batch
and plain jnp functions (Ioffe 2017, Algorithm 1, for renorm) that JAX
differentiates itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from np_reference import np_forward, np_stats

import jbn


def bcast(v, ndim):
    """A per-feature vector shaped to broadcast against the last axis of an ndim array."""
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


# --------------------------------------------------------------------------- #
# Ghost batch norm.
# --------------------------------------------------------------------------- #


def ghost_reference(scale, bias, x, vbs, eps=1e-5):
    """Plain jnp ghost batch norm, feature axis last, for JAX to differentiate."""
    xg = x.reshape((x.shape[0] // vbs, vbs) + x.shape[1:])
    red = tuple(range(1, xg.ndim - 1))
    mean = xg.mean(red, keepdims=True)
    var = jnp.square(xg - mean).mean(red, keepdims=True)
    y = (xg - mean) / jnp.sqrt(var + eps) * bcast(scale, xg.ndim) + bcast(bias, xg.ndim)
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    "shape, vbs, unbiased", [((12, 3), 4, False), ((8, 3, 3, 2), 2, True), ((6, 4), 6, False)]
)
def test_ghost_forward_and_running_stats_match_numpy(shape, vbs, unbiased):
    k = jax.random.split(jax.random.key(0), 3)
    x = 2.0 * jax.random.normal(k[0], shape) + jnp.arange(shape[0], dtype=jnp.float32).reshape(
        (-1,) + (1,) * (len(shape) - 1)
    )
    c = shape[-1]
    params = {
        "scale": 1 + 0.3 * jax.random.normal(k[1], (c,)),
        "bias": 0.3 * jax.random.normal(k[2], (c,)),
    }
    state = {"mean": jnp.full((c,), 0.5), "var": jnp.full((c,), 2.0)}
    forward = functools.partial(
        jbn.bn_forward, momentum=0.8, virtual_batch_size=vbs, unbiased_running_var=unbiased
    )
    y, new = jax.jit(forward, static_argnums=3)(params, state, x, True)
    means, vars_ = [], []
    for g in range(shape[0] // vbs):
        xs = x[g * vbs : (g + 1) * vbs]
        y_np, m, v, n = np_forward(xs, params["scale"], params["bias"])
        np.testing.assert_allclose(y[g * vbs : (g + 1) * vbs], y_np, rtol=1e-5, atol=1e-5)
        means.append(m)
        vars_.append(v * n / (n - 1) if unbiased else v)
    np.testing.assert_allclose(new["mean"], 0.8 * 0.5 + 0.2 * np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.8 * 2.0 + 0.2 * np.mean(vars_, 0), rtol=1e-5)


def test_ghost_masked_groups_use_their_own_counts():
    x = jax.random.normal(jax.random.key(1), (8, 5, 2)) * 2 + 1
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (8, 5, 1))
    state = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
    y, new = jbn.bn_forward(None, state, x, True, momentum=0.0, virtual_batch_size=4, mask=mask)
    stats = [np_stats(x[g * 4 : (g + 1) * 4], mask=mask[g * 4 : (g + 1) * 4]) for g in range(2)]
    for g, (m, v, _) in enumerate(stats):
        y_np = (np.asarray(x[g * 4 : (g + 1) * 4], np.float64) - m) / np.sqrt(v + 1e-5)
        np.testing.assert_allclose(y[g * 4 : (g + 1) * 4], y_np, rtol=1e-5, atol=1e-5)
    n = np.array([s[2] for s in stats]).reshape(2, 2)
    w = n / n.sum(0)
    np.testing.assert_allclose(
        new["mean"], (w * np.array([s[0] for s in stats]).reshape(2, 2)).sum(0), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], (w * np.array([s[1] for s in stats]).reshape(2, 2)).sum(0), rtol=1e-5
    )


@pytest.mark.parametrize("residual", ["input", "output"])
def test_ghost_gradient_matches_autodiff_reference(residual):
    with jax.enable_x64():
        k = jax.random.split(jax.random.key(3), 4)
        x = 2.0 * jax.random.normal(k[0], (6, 2, 3), jnp.float64) + 1.0
        scale = 1 + 0.3 * jax.random.normal(k[1], (3,), jnp.float64)
        bias = 0.3 * jax.random.normal(k[2], (3,), jnp.float64)
        w = jax.random.normal(k[3], x.shape, jnp.float64)
        state = {"mean": jnp.zeros(3, jnp.float64), "var": jnp.ones(3, jnp.float64)}

        def loss(scale, bias, x):
            y, _ = jbn.bn_forward(
                {"scale": scale, "bias": bias},
                state,
                x,
                True,
                virtual_batch_size=3,
                residual=residual,
            )
            return jnp.sum(jnp.sin(y) * w)

        ref = lambda scale, bias, x: jnp.sum(jnp.sin(ghost_reference(scale, bias, x, 3)) * w)  # noqa: E731

        @jax.jit
        def derivatives(scale, bias, x):
            out = []
            for f in (loss, ref):
                # Value, gradient, and a Hessian-vector product through the custom_vjp.
                hvp = jax.grad(lambda x, f=f: jnp.sum(jax.grad(f, 2)(scale, bias, x) * w))(x)
                out.append((f(scale, bias, x), jax.grad(f, (0, 1, 2))(scale, bias, x), hvp))
            return out

        got, want = derivatives(scale, bias, x)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10), got, want
        )


def test_ghost_errors():
    x = jnp.ones((6, 3))
    p, s = jbn.bn_init(3)
    with pytest.raises(
        ValueError, match=r"virtual_batch_size=4 does not divide the batch: x has shape \(6, 3\)"
    ):
        jbn.bn_forward(p, s, x, True, virtual_batch_size=4)
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        jbn.bn_forward(
            bn_init_p := jbn.bn_init(6)[0], jbn.bn_init(6)[1], x, True, axis=0, virtual_batch_size=3
        )
    del bn_init_p
    # With axis_name, the ghost batches group indices of the named axes (jbn.equinox's way).
    with pytest.raises(
        ValueError, match="virtual_batch_size=4 does not divide the batch: the named"
    ):
        jax.vmap(
            lambda e: jbn.bn_forward(p, s, e, True, axis=0, virtual_batch_size=4, axis_name="d"),
            axis_name="d",
        )(jnp.ones((6, 3, 2)))
    with pytest.raises(ValueError, match="positive int"):
        jbn.bn_forward(p, s, x, True, virtual_batch_size=0)
    with pytest.raises(TypeError, match="positive int"):
        jbn.bn_forward(p, s, x, True, virtual_batch_size=2.0)
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        jbn.bn_forward(p, s, x, True, virtual_batch_size=1)
    # Evaluation ignores the ghost batches: any batch size works.
    jbn.bn_forward(p, s, x, False, virtual_batch_size=4)


# --------------------------------------------------------------------------- #
# Batch renormalization.
# --------------------------------------------------------------------------- #


def renorm_reference(scale, bias, x, rmean, rvar, rmax, dmax, eps=1e-5):
    """Ioffe (2017), Algorithm 1, in plain jnp (feature axis last)."""
    red = tuple(range(x.ndim - 1))
    mean = x.mean(red, keepdims=True)
    sigma_b = jnp.sqrt(jnp.square(x - mean).mean(red, keepdims=True) + eps)
    sigma = jnp.sqrt(bcast(rvar, x.ndim) + eps)
    r = lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / rmax, rmax))
    d = lax.stop_gradient(jnp.clip((mean - bcast(rmean, x.ndim)) / sigma, -dmax, dmax))
    return ((x - mean) / sigma_b * r + d) * bcast(scale, x.ndim) + bcast(bias, x.ndim)


def _renorm_case(dtype):
    k = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(k[0], (10, 4), dtype) * jnp.array([[0.5, 1.0, 3.0, 10.0]], dtype) + 1.0
    params = {
        "scale": (1 + 0.3 * jax.random.normal(k[1], (4,), dtype)),
        "bias": 0.3 * jax.random.normal(k[2], (4,), dtype),
    }
    # Running statistics far enough off that some features clip r or d and some do not.
    state = {
        "mean": jnp.array([1.0, 0.0, 2.0, -30.0], dtype),
        "var": jnp.array([0.3, 1.0, 1.0, 1.0], dtype),
    }
    w = jax.random.normal(k[3], x.shape, dtype)
    return x, params, state, w


def test_renorm_limit_is_plain_batch_norm():
    x, params, state, w = _renorm_case(jnp.float32)

    def f(params, x, **kw):
        y, new = jbn.bn_forward(params, state, x, True, momentum=0.9, **kw)
        return jnp.sum(jnp.sin(y) * w), (y, new)

    (_, out_r), g_r = jax.value_and_grad(f, (0, 1), has_aux=True)(
        params, x, renorm=True, rmax=1.0, dmax=0.0
    )
    (_, out_p), g_p = jax.value_and_grad(f, (0, 1), has_aux=True)(params, x)
    jax.tree.map(np.testing.assert_array_equal, (out_r, g_r), (out_p, g_p))


def test_renorm_forward_and_gradient_match_reference():
    with jax.enable_x64():
        x, params, state, w = _renorm_case(jnp.float64)
        rmax, dmax = 1.5, 0.5

        def loss(params, x):
            y, _ = jbn.bn_forward(params, state, x, True, renorm=True, rmax=rmax, dmax=dmax)
            return jnp.sum(jnp.sin(y) * w)

        def ref(params, x):
            y = renorm_reference(
                params["scale"], params["bias"], x, state["mean"], state["var"], rmax, dmax
            )
            return jnp.sum(jnp.sin(y) * w)

        y, new = jbn.bn_forward(
            params, state, x, True, momentum=0.9, renorm=True, rmax=rmax, dmax=dmax
        )
        y_ref = renorm_reference(
            params["scale"], params["bias"], x, state["mean"], state["var"], rmax, dmax
        )
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        # Clipping is active on some features and not on others: the case is not trivial.
        sb, s = np.sqrt(np.var(np.asarray(x), 0) + 1e-5), np.sqrt(np.asarray(state["var"]) + 1e-5)
        assert np.any(np.abs(np.log(sb / s)) > np.log(rmax)) and np.any(
            np.abs(np.log(sb / s)) < np.log(rmax)
        )
        # Running statistics are updated as usual.
        _, plain = jbn.bn_forward(params, state, x, True, momentum=0.9)
        jax.tree.map(np.testing.assert_array_equal, new, plain)
        g, g_ref = jax.jit(
            lambda p, x: (jax.grad(loss, (0, 1))(p, x), jax.grad(ref, (0, 1))(p, x))
        )(params, x)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11), g, g_ref)


def test_renorm_with_ghost_batches_uses_each_groups_statistics():
    with jax.enable_x64():
        x, params, state, w = _renorm_case(jnp.float64)
        y, _ = jbn.bn_forward(
            params, state, x, True, renorm=True, rmax=2.0, dmax=1.0, virtual_batch_size=5
        )
        for g in range(2):
            y_ref = renorm_reference(
                params["scale"],
                params["bias"],
                x[5 * g : 5 * g + 5],
                state["mean"],
                state["var"],
                2.0,
                1.0,
            )
            np.testing.assert_allclose(y[5 * g : 5 * g + 5], y_ref, rtol=1e-12, atol=1e-12)


def test_renorm_errors():
    p, s = jbn.bn_init(3)
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"rmax must be >= 1.0"):
        jbn.bn_forward(p, s, x, True, renorm=True, rmax=0.5)
    with pytest.raises(ValueError, match=r"dmax must be >= 0.0"):
        jbn.bn_forward(p, s, x, True, renorm=True, dmax=-1.0)
    with pytest.raises(ValueError, match="rmax must be a scalar"):
        jbn.bn_forward(p, s, x, True, renorm=True, rmax=jnp.ones(3))
    with pytest.raises(TypeError, match="dmax must be a float"):
        jbn.bn_forward(p, s, x, True, renorm=True, dmax="5")
    with pytest.raises(TypeError, match="renorm must be a Python bool"):
        jbn.bn_forward(p, s, x, True, renorm=1)
