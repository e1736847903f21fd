"""Model tools: folding, recalibration, ghost batch norm and batch renormalization.

References are independent of jbn: NumPy float64 transcriptions and plain jnp
functions that JAX differentiates itself.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import random_variables
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


# --------------------------------------------------------------------------- #
# Folding.
# --------------------------------------------------------------------------- #


def _bn_vars(key, c):
    return random_variables(
        key, (c,), scale_std=0.5, bias_std=0.5, mean_std=2.0, var_range=(0.2, 3.0)
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", ["both", "scale", "none"])
def test_fold_batch_norm_matches_numpy(with_bias, affine):
    k = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k[0], (7, 4))
    kernel = jax.random.normal(k[1], (4, 3))
    bias = jax.random.normal(k[2], (3,)) if with_bias else None
    bn_params, bn_state = _bn_vars(k[3], 3)
    bn_params = {"both": bn_params, "scale": {"scale": bn_params["scale"]}, "none": None}[affine]
    new_kernel, new_bias = jbn.fold_batch_norm(kernel, bias, bn_params, bn_state, epsilon=1e-3)
    assert new_kernel.dtype == kernel.dtype and new_bias.shape == (3,)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    z = f64(x) @ f64(kernel) + (0 if bias is None else f64(bias))
    bp = bn_params or {}
    y_np = (z - f64(bn_state["mean"])) / np.sqrt(f64(bn_state["var"]) + 1e-3) * f64(
        bp.get("scale", 1.0)
    ) + f64(bp.get("bias", 0.0))
    np.testing.assert_allclose(x @ new_kernel + new_bias[None], y_np, rtol=1e-5, atol=1e-5)


class FoldCNN(nn.Module):
    """The demo CNN in miniature; ``fold=True`` is the same model with the batch norms folded away."""

    fold: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def norm(x, name):
            return x if self.fold else jbn.BatchNorm(use_running_average=not train, name=name)(x)

        for i, features in enumerate((4, 6)):
            x = nn.Conv(features, (3, 3), use_bias=self.fold, name=f"conv{i + 1}")(x)
            x = nn.max_pool(nn.relu(norm(x, f"bn{i + 1}")), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(norm(nn.Dense(8, name="dense1")(x), "bn3"))
        return nn.Dense(3, name="out")(x)


PAIRS = [("conv1", "bn1"), ("conv2", "bn2"), ("dense1", "bn3")]


@pytest.fixture(scope="module")
def cnn_input_and_variables():
    x = jax.random.normal(jax.random.key(6), (4, 8, 8, 2)) + 0.5
    return x, jax.jit(FoldCNN().init)(jax.random.key(7), x)


def test_folded_cnn_matches_eval_mode(cnn_input_and_variables):
    x, variables = cnn_input_and_variables
    for i, (_, bn) in enumerate(PAIRS):
        p, s = _bn_vars(jax.random.key(10 + i), variables["batch_stats"][bn]["mean"].shape[0])
        variables = {
            "params": {**variables["params"], bn: p},
            "batch_stats": {**variables["batch_stats"], bn: s},
        }
    folded = jbn.fold_batch_norm_variables(variables, PAIRS)
    # Exactly the variables of the fold=True model.
    expect = jax.eval_shape(FoldCNN(fold=True).init, jax.random.key(7), x)
    assert jax.tree.map(jnp.shape, folded) == jax.tree.map(jnp.shape, expect)
    y = jax.jit(FoldCNN().apply)(variables, x)
    y_fold = jax.jit(FoldCNN(fold=True).apply)(folded, x)
    np.testing.assert_allclose(y_fold, y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y))))
    assert "batch_stats" in variables and variables["params"]["bn1"]  # the input is left alone
    # The same, checked on the probe batch by fold itself.
    check = (FoldCNN().apply, FoldCNN(fold=True).apply, x)
    checked = jbn.fold_batch_norm_variables(variables, PAIRS, check=check)
    jax.tree.map(np.testing.assert_array_equal, checked, folded)


class ActivationBetween(nn.Module):
    """A batch norm after a ReLU: it cannot be folded into the Dense before the ReLU."""

    fold: bool = False
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, use_bias=self.fold, name="dense")(x)
        if self.fold:
            return nn.relu(x)
        return jbn.BatchNorm(use_running_average=True, epsilon=self.epsilon, name="bn")(nn.relu(x))


@pytest.mark.parametrize("case", ["epsilon", "activation"])
def test_fold_check_refuses_a_wrong_fold(case):
    x = jax.random.normal(jax.random.key(1), (16, 4))
    model = ActivationBetween(epsilon=0.1 if case == "epsilon" else 1e-5)
    if case == "epsilon":  # a plain Dense -> BN model folded with the default epsilon
        model, folded_model = FoldCNN(), FoldCNN(fold=True)
        x = jax.random.normal(jax.random.key(6), (4, 8, 8, 2)) + 0.5
        variables = jax.jit(FoldCNN().init)(jax.random.key(7), x)
        variables = {
            **variables,
            "batch_stats": jax.tree.map(lambda v: v * 0.0 + 1e-3, variables["batch_stats"]),
        }
        check = (model.apply, folded_model.apply, x)
        folded = jbn.fold_batch_norm_variables(variables, PAIRS, epsilon=1e-5, check=check)
        with pytest.raises(ValueError, match=r"differs from the original.*epsilon is not 0.1"):
            jbn.fold_batch_norm_variables(variables, PAIRS, epsilon=0.1, check=check)
        assert folded["params"]["conv1"]["bias"].shape == (4,)
        return
    variables = model.init(jax.random.key(0), x)
    p, s = _bn_vars(jax.random.key(2), 6)
    variables = {"params": {**variables["params"], "bn": p}, "batch_stats": {"bn": s}}
    check = (model.apply, ActivationBetween(fold=True).apply, x)
    with pytest.raises(
        ValueError, match="something sits between a pair's layer and its batch norm"
    ):
        jbn.fold_batch_norm_variables(variables, [("dense", "bn")], check=check)
    with pytest.raises(TypeError, match=r"check must be \(apply_fn, folded_apply_fn, x\)"):
        jbn.fold_batch_norm_variables(variables, [("dense", "bn")], check=(model.apply, x))


def test_fold_errors(cnn_input_and_variables):
    p, s = _bn_vars(jax.random.key(0), 3)
    with pytest.raises(
        ValueError, match=r"bn_state\['mean'\] has shape \(3,\), but the kernel of shape \(4, 5\)"
    ):
        jbn.fold_batch_norm(jnp.ones((4, 5)), None, p, s)
    with pytest.raises(ValueError, match=r"bias has shape \(2,\)"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), jnp.ones(2), p, s)
    with pytest.raises(ValueError, match="bn_state must be a dict"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, p, {"mean": s["mean"]})
    with pytest.raises(ValueError, match="unknown keys"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, {"gamma": p["scale"]}, s)
    with pytest.raises(ValueError, match=r"epsilon must be > 0\.0, got 0\.0"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, p, s, epsilon=0.0)
    v = cnn_input_and_variables[1]
    with pytest.raises(ValueError, match="no layer with a 'kernel' at 'conv9'"):
        jbn.fold_batch_norm_variables(v, [("conv9", "bn1")])
    with pytest.raises(ValueError, match="no batch norm .* at 'bn9'"):
        jbn.fold_batch_norm_variables(v, [("conv1", "bn9")])
    with pytest.raises(
        ValueError,
        match=r"bn_state\['mean'\] has shape \(6,\), but the kernel of shape \(3, 3, 2, 4\)",
    ):
        jbn.fold_batch_norm_variables(v, [("conv1", "bn2")])
    with pytest.raises(ValueError, match="already uses"):
        jbn.fold_batch_norm_variables(v, [("conv1", "bn1"), ("conv1", "bn1")])
    with pytest.raises(ValueError, match="pairs is empty"):
        jbn.fold_batch_norm_variables(v, [])
    with pytest.raises(ValueError, match=r"each pair must be \(layer_path, bn_path\)"):
        jbn.fold_batch_norm_variables(v, ["conv1"])
    with pytest.raises(ValueError, match="kernel must be a floating-point array"):
        jbn.fold_batch_norm(jnp.ones((4, 3), jnp.int32), None, p, s)
    with pytest.raises(TypeError, match="bn_params must be a dict"):
        jbn.fold_batch_norm(jnp.ones((4, 3)), None, [p["scale"]], s)
    bad = {
        "params": {"conv1": {"kernel": jnp.ones((3, 3, 2, 3))}, "bn1": [1.0]},
        "batch_stats": {"bn1": s},
    }
    with pytest.raises(ValueError, match="'params' collection"):
        jbn.fold_batch_norm_variables({"batch_stats": {}}, [("conv1", "bn1")])
    with pytest.raises(ValueError, match="layer_path must be a module path"):
        jbn.fold_batch_norm_variables(bad, [("", "bn1")])
    with pytest.raises(ValueError, match="is not a batch norm's parameters"):
        jbn.fold_batch_norm_variables(bad, [("conv1", "bn1")])


# --------------------------------------------------------------------------- #
# Recalibration.
# --------------------------------------------------------------------------- #


class MLP(nn.Module):
    norm: type = jbn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        is_jbn = self.norm is jbn.BatchNorm
        x = nn.relu(
            self.norm(use_running_average=not train, name="bn1")(nn.Dense(6, name="dense1")(x))
        )
        kw = dict(momentum=None) if is_jbn else {}  # a cumulative layer
        x = nn.relu(
            self.norm(use_running_average=not train, name="bn2", **kw)(
                nn.Dense(5, name="dense2")(x)
            )
        )
        return nn.Dense(2, name="out")(x)


def _batches():
    k = jax.random.split(jax.random.key(8), 3)
    # Unequal sizes and different distributions: a plain average of batch statistics would be wrong.
    return [
        jax.random.normal(k[0], (5, 4)),
        3.0 + 2.0 * jax.random.normal(k[1], (9, 4)),
        -1.0 + 0.5 * jax.random.normal(k[2], (4, 4)),
    ]


def _np_layer(v, name, h):
    p = v["params"][name]
    return np.asarray(h, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(
        p["bias"], np.float64
    )


def _np_bn(v, name, h, mean, var):
    p = v["params"][name]
    return (h - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"], np.float64) + np.asarray(
        p["bias"], np.float64
    )


@pytest.fixture(scope="module")
def mlp_variables():
    v = MLP().init(jax.random.key(9), jnp.ones((2, 4)), train=False)
    stats = jax.tree.map(
        lambda a: a + 7 if a.dtype == jnp.float32 else a + 5, v["batch_stats"]
    )  # stale statistics
    return {**v, "batch_stats": stats}


def _train_apply(v, x):
    return MLP().apply(v, x, train=True, mutable=["batch_stats"])


def _eval_apply(v, x):
    return MLP().apply(v, x, train=False, mutable=["batch_stats"])


def test_recalibrate_train_mode_gives_population_statistics(mlp_variables):
    v, batches = mlp_variables, _batches()
    new = jbn.recalibrate_batch_stats(_train_apply, v, batches)
    assert new["params"] is v["params"]
    assert jax.tree.structure(new) == jax.tree.structure(v)
    h1 = [_np_layer(v, "dense1", x) for x in batches]
    m1, v1, _ = np_stats(np.concatenate(h1))
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["mean"], m1.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["var"], v1.ravel(), rtol=1e-5)
    # The second layer sees the first normalized with each batch's own statistics.
    h2 = []
    for h in h1:
        m, var, _ = np_stats(h)
        h2.append(_np_layer(v, "dense2", np.maximum(_np_bn(v, "bn1", h, m, var), 0)))
    m2, v2, _ = np_stats(np.concatenate(h2))
    np.testing.assert_allclose(new["batch_stats"]["bn2"]["mean"], m2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn2"]["var"], v2.ravel(), rtol=1e-5)
    assert (new["batch_stats"]["bn2"]["count"] == 3).all()  # cumulative layer: one per batch


def test_recalibrate_eval_mode_passes_make_deeper_layers_exact(mlp_variables):
    v, batches = mlp_variables, _batches()
    one = jbn.recalibrate_batch_stats(_eval_apply, v, batches)
    two = jbn.recalibrate_batch_stats(_eval_apply, v, batches, passes=2)
    h1 = np.concatenate([_np_layer(v, "dense1", x) for x in batches])
    m1, v1, _ = np_stats(h1)
    for out in (one, two):
        np.testing.assert_allclose(
            out["batch_stats"]["bn1"]["mean"], m1.ravel(), rtol=1e-5, atol=1e-6
        )
    # At evaluation the second layer sees the first normalized with its (recalibrated) running statistics.
    h2 = _np_layer(v, "dense2", np.maximum(_np_bn(v, "bn1", h1, m1, v1), 0))
    m2, v2, _ = np_stats(h2)
    np.testing.assert_allclose(two["batch_stats"]["bn2"]["mean"], m2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["batch_stats"]["bn2"]["var"], v2.ravel(), rtol=1e-5)
    assert not np.allclose(
        one["batch_stats"]["bn2"]["mean"], m2.ravel(), rtol=1e-3
    )  # one pass is not enough


def test_recalibrate_unbiased_and_masked():
    model = jbn.BatchNorm(use_running_average=False, unbiased_running_var=True)
    batches = [
        (
            jax.random.normal(jax.random.key(i), (3, 5, 2)) * (i + 1) + i,
            jax.random.bernoulli(jax.random.key(10 + i), 0.6, (3, 5, 1)),
        )
        for i in range(3)
    ]
    v = model.init(jax.random.key(0), batches[0][0])
    new = jbn.recalibrate_batch_stats(
        lambda v, b: model.apply(v, b[0], mask=b[1], mutable=["batch_stats"]), v, batches
    )
    x = np.concatenate([np.asarray(b[0]).reshape(-1, 2) for b in batches])
    m = np.concatenate(
        [np.broadcast_to(np.asarray(b[1]), b[0].shape).reshape(-1, 2) for b in batches]
    )
    for c in range(2):
        values = x[m[:, c], c].astype(np.float64)
        np.testing.assert_allclose(new["batch_stats"]["mean"][c], values.mean(), rtol=1e-5)
        np.testing.assert_allclose(new["batch_stats"]["var"][c], values.var(ddof=1), rtol=1e-5)


def test_recalibrate_errors(mlp_variables):
    v, batches = mlp_variables, _batches()
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        jbn.recalibrate_batch_stats(_train_apply, {"params": v["params"]}, batches)
    with pytest.raises(
        ValueError, match=r"not recalibrated: \['bn1', 'bn2'\].*flax.linen.BatchNorm"
    ):
        flax_mlp = MLP(norm=nn.BatchNorm)
        jbn.recalibrate_batch_stats(
            lambda v, x: flax_mlp.apply(v, x, train=True, mutable=["batch_stats"]), v, batches
        )
    with pytest.raises(ValueError, match=r"apply_fn must pass mutable=\['batch_stats'\]"):
        jbn.recalibrate_batch_stats(
            lambda v, x: (MLP().apply(v, x, train=False), {"batch_stats": {}}), v, batches
        )
    with pytest.raises(TypeError, match=r"must return \(output, updates\)"):
        jbn.recalibrate_batch_stats(
            lambda v, x: MLP().apply(v, x, train=True, mutable=["batch_stats"])[0], v, batches
        )
    with pytest.raises(ValueError, match="on pass 2: with passes > 1 give a list"):
        jbn.recalibrate_batch_stats(_train_apply, v, iter(batches), passes=2)
    with pytest.raises(ValueError, match="yielded no batch"):
        jbn.recalibrate_batch_stats(_train_apply, v, [])
    with pytest.raises(ValueError, match="passes must be a positive int"):
        jbn.recalibrate_batch_stats(_train_apply, v, batches, passes=0)
    with pytest.raises(ValueError, match="holds no batch-norm layer"):
        jbn.recalibrate_batch_stats(
            _train_apply, {"params": {}, "batch_stats": {"Dense_0": {}}}, [jnp.ones((2, 4))]
        )


class NnxMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.dense1 = nnx.Linear(4, 6, rngs=rngs)
        self.bn1 = jbn.nnx.BatchNorm(6, rngs=rngs)
        self.dense2 = nnx.Linear(6, 5, rngs=rngs)
        self.bn2 = jbn.nnx.BatchNorm(5, momentum=None, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))


def test_nnx_recalibrate_matches_numpy():
    model = NnxMLP(rngs=nnx.Rngs(0))
    model.bn1.mean[...] += 5.0
    batches = _batches()
    params_before = nnx.clone(nnx.state(model, nnx.Param))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h1 = np.concatenate(
        [f64(x) @ f64(model.dense1.kernel[...]) + f64(model.dense1.bias[...]) for x in batches]
    )
    m1, v1, _ = np_stats(h1)
    model.eval()
    jbn.nnx.recalibrate_batch_stats(model, batches, passes=2)
    np.testing.assert_allclose(model.bn1.mean[...], m1.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn1.var[...], v1.ravel(), rtol=1e-5)
    a = np.maximum((h1 - m1) / np.sqrt(v1 + 1e-5), 0)  # scale 1, bias 0 at init
    m2, v2, _ = np_stats(a @ f64(model.dense2.kernel[...]) + f64(model.dense2.bias[...]))
    np.testing.assert_allclose(model.bn2.mean[...], m2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn2.var[...], v2.ravel(), rtol=1e-5)
    assert (model.bn2.count[...] == 3).all() and isinstance(model.bn1, jbn.nnx.BatchNorm)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)
    with pytest.raises(ValueError, match="no jbn.nnx.BatchNorm"):
        jbn.nnx.recalibrate_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches)


def test_recalibration_on_shifted_data_restores_accuracy():
    """Train on one distribution, then the inputs shift and shrink; recalibrating the running statistics recovers."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(jbn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x)))
            return nn.Dense(2)(x)

    k = jax.random.split(jax.random.key(11), 3)
    centers = 1.5 * jax.random.normal(k[0], (2, 8))
    labels = jax.random.bernoulli(k[1], 0.5, (512,)).astype(jnp.int32)
    x = centers[labels] + jax.random.normal(k[2], (512, 8))
    net = Net()
    variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(12), x[:2])
    tx = optax.adam(1e-2)
    opt = tx.init(variables["params"])

    @jax.jit
    def train_step(variables, opt, x, labels):
        def loss(params):
            logits, upd = net.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        grads, upd = jax.grad(loss, has_aux=True)(variables["params"])
        updates, opt = tx.update(grads, opt)
        return {"params": optax.apply_updates(variables["params"], updates), **upd}, opt

    for i in range(60):
        sl = slice(64 * (i % 8), 64 * (i % 8) + 64)
        variables, opt = train_step(variables, opt, x[sl], labels[sl])
    accuracy = jax.jit(
        lambda v, x: jnp.mean(jnp.argmax(net.apply(v, x, train=False), -1) == labels)
    )
    assert accuracy(variables, x) > 0.9
    shifted = 0.5 * x + (centers[1] - centers[0])[None]  # every example drifts toward class 1
    before = float(accuracy(variables, shifted))
    batches = [shifted[i : i + 100] for i in range(0, 512, 100)]
    recalibrated = jbn.recalibrate_batch_stats(
        lambda v, b: net.apply(v, b, train=True, mutable=["batch_stats"]), variables, batches
    )
    after = float(accuracy(recalibrated, shifted))
    assert after > 0.9 and after > before + 0.2, (before, after)


def test_nnx_recalibrate_errors_leave_the_model_as_it_was():
    model = NnxMLP(rngs=nnx.Rngs(0))
    bn1 = model.bn1
    before = nnx.clone(nnx.state(model))
    with pytest.raises(ValueError, match="passes must be a positive int"):
        jbn.nnx.recalibrate_batch_stats(model, [jnp.ones((2, 4))], passes=True)
    with pytest.raises(ValueError, match="on pass 2"):
        jbn.nnx.recalibrate_batch_stats(model, iter([jnp.ones((2, 4))]), passes=2)
    with pytest.raises(ValueError, match=r"not recalibrated: \['bn2'\]"):
        jbn.nnx.recalibrate_batch_stats(
            model, [jnp.ones((2, 4))], forward=lambda m, x: m.bn1(m.dense1(x))
        )
    # A failed second pass (a generator runs dry) writes nothing either.
    with pytest.raises(ValueError, match="on pass 2"):
        jbn.nnx.recalibrate_batch_stats(model, (b for b in [jnp.ones((2, 4))]), passes=2)
    assert model.bn1 is bn1  # the wrappers are gone after an error too
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
