"""jbn.BatchNorm against flax.linen.BatchNorm(use_fast_variance=False): same models, same numbers."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, perturb_variables
from np_reference import np_stats

import jbn

FLAX_BN = functools.partial(nn.BatchNorm, use_fast_variance=False)
RTOL = 1e-5


class MLP(nn.Module):
    norm: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.relu(self.norm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Dense(8, use_bias=False)(x)
        x = nn.relu(self.norm(use_running_average=not train, use_scale=False, epsilon=1e-3)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    """The demo's shape in miniature: conv → BN → relu → pool, dense → BN → relu, dense."""

    norm: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(self.norm(use_running_average=not train, momentum=0.9)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.norm(use_running_average=not train)(nn.Dense(8, use_bias=False)(x)))
        return nn.Dense(3)(x)


MODELS = {"mlp": (MLP, (12, 5)), "cnn": (CNN, (6, 6, 6, 2))}


def run(model, variables, x, weights):
    """Per mode (train, eval): output, new batch_stats, gradients of a loss w.r.t. params and x."""

    def loss(params, x, train):
        v = {**variables, "params": params}
        if train:
            y, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        else:
            y, updates = model.apply(v, x, train=False), {}
        return jnp.sum(jnp.sin(y) * weights), (y, updates)

    def both(params, x):
        out = {}
        for train in (True, False):
            (_, (y, updates)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
                params, x, train
            )
            out[train] = (y, updates, grads)
        return out

    return jax.jit(both)(variables["params"], x)


@pytest.mark.parametrize("name", MODELS)
def test_model_matches_flax(name):
    cls, shape = MODELS[name]
    kx, kw, ki = jax.random.split(jax.random.key(0), 3)
    x = 1.0 + 2.0 * jax.random.normal(kx, shape)
    flax_model, jbn_model = cls(FLAX_BN), cls(jbn.BatchNorm)
    # Initialized by either, the variables are identical (names, shapes, dtypes,
    # values), and the running statistics keep their initial values.
    v_f = jax.jit(functools.partial(flax_model.init, train=True))(ki, x)
    v_j = jax.jit(functools.partial(jbn_model.init, train=True))(ki, x)
    assert jax.tree.structure(v_f) == jax.tree.structure(v_j)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), v_f, v_j)
    for layer in v_j["batch_stats"].values():
        np.testing.assert_array_equal(layer["mean"], 0.0)
        np.testing.assert_array_equal(layer["var"], 1.0)
    # So each runs on the other's variables; compare them on non-trivial ones.
    variables = perturb_variables(v_f, 0)
    weights = jax.random.normal(kw, (shape[0], 3))
    out_f = run(flax_model, variables, x, weights)
    out_j = run(jbn_model, variables, x, weights)
    for train in (True, False):
        y_f, upd_f, g_f = out_f[train]
        y_j, upd_j, g_j = out_j[train]
        assert_trees_close(y_j, y_f)
        assert_trees_close(upd_j, upd_f)
        assert_trees_close(g_j, g_f)


DTYPE_CASES = {
    "f32": dict(x=jnp.float32),
    "bf16_x": dict(x=jnp.bfloat16),
    "bf16_x_no_affine": dict(x=jnp.bfloat16, use_scale=False, use_bias=False),
    "dtype_bf16": dict(x=jnp.float32, dtype=jnp.bfloat16),
    "param_bf16": dict(x=jnp.float32, param_dtype=jnp.bfloat16),
    "param_bf16_no_force": dict(
        x=jnp.bfloat16, param_dtype=jnp.bfloat16, force_float32_reductions=False
    ),
}


@pytest.mark.parametrize("case", DTYPE_CASES)
def test_dtypes_follow_flax(case):
    kw = dict(DTYPE_CASES[case])
    x = (1.0 + jax.random.normal(jax.random.key(3), (16, 4))).astype(kw.pop("x"))
    f, j = FLAX_BN(momentum=0.9, **kw), jbn.BatchNorm(momentum=0.9, **kw)
    v = perturb_variables(f.init(jax.random.key(4), x, use_running_average=False), 5)
    assert jax.tree.map(
        lambda a: a.dtype, j.init(jax.random.key(4), x, use_running_average=False)
    ) == jax.tree.map(lambda a: a.dtype, f.init(jax.random.key(4), x, use_running_average=False))
    tol = 1e-5 if x.dtype == jnp.float32 and kw.get("dtype") is None else 2e-2
    for ura in (False, True):
        y_f, u_f = f.apply(v, x, use_running_average=ura, mutable=["batch_stats"])
        y_j, u_j = j.apply(v, x, use_running_average=ura, mutable=["batch_stats"])
        assert y_j.dtype == y_f.dtype
        np.testing.assert_allclose(
            np.asarray(y_j, np.float32), np.asarray(y_f, np.float32), rtol=tol, atol=tol
        )
        assert jax.tree.map(lambda a: a.dtype, u_j) == jax.tree.map(lambda a: a.dtype, u_f)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol
            ),
            u_j,
            u_f,
        )


@pytest.mark.parametrize(
    "shape, axis, masked",
    [((4, 6, 3, 5), 1, False), ((3, 4, 5, 2), (1, 2, 3), False), ((5, 7, 3), -1, True)],
    ids=["NCHW", "per_activation", "NTC_mask"],
)
def test_axes_and_mask_match_flax(shape, axis, masked):
    x = 2.0 * jax.random.normal(jax.random.key(6), shape) - 1.0
    mask = jax.random.bernoulli(jax.random.key(7), 0.7, shape[:-1] + (1,)) if masked else None
    f, j = FLAX_BN(axis=axis, momentum=0.8), jbn.BatchNorm(axis=axis, momentum=0.8)
    v = perturb_variables(f.init(jax.random.key(8), x, use_running_average=False), 9)
    weights = jax.random.normal(jax.random.key(10), shape)

    def go(m):
        def loss(v, x):
            y, u = m.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
            return jnp.sum(y * weights), (y, u)

        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(v, x)

    (_, (y_f, u_f)), g_f = go(f)
    (_, (y_j, u_j)), g_j = go(j)
    assert_trees_close((y_j, u_j), (y_f, u_f))
    assert_trees_close(g_j, g_f)


def test_axis_name_under_vmap_matches_flax():
    x = jax.random.normal(jax.random.key(11), (4, 6, 3)) + jnp.arange(4.0)[:, None, None]
    f, j = FLAX_BN(axis_name="d", momentum=0.9), jbn.BatchNorm(axis_name="d", momentum=0.9)
    v = f.init(jax.random.key(12), x[0], use_running_average=False)  # init ignores axis_name

    def go(m):
        apply = lambda x: m.apply(v, x, use_running_average=False, mutable=["batch_stats"])  # noqa: E731
        return jax.vmap(apply, axis_name="d")(x)

    assert_trees_close(go(j), go(f))


# --------------------------------------------------------------------------- #
# Flax's conventions and errors.
# --------------------------------------------------------------------------- #


def test_use_running_average_must_be_given_once():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="use_running_average"):
        jbn.BatchNorm().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        jbn.BatchNorm(use_running_average=True).init(
            jax.random.key(0), x, use_running_average=False
        )


def test_training_without_mutable_batch_stats_says_what_to_pass():
    bn = jbn.BatchNorm(use_running_average=False)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    v = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"pass mutable=\['batch_stats'\]"):
        bn.apply(v, x)
    bn.apply(v, x, use_running_average=None, mutable=["batch_stats"])  # fine


def test_init_batch_of_one_and_ghost_batches():
    # A dummy batch of one example: flax-style init works in training mode too.
    x1 = jnp.ones((1, 5))
    v = jbn.BatchNorm(use_running_average=False, virtual_batch_size=4, renorm=True).init(
        jax.random.key(0), x1
    )
    assert v["batch_stats"]["mean"].shape == (5,)
    y, _ = jbn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x1)
    np.testing.assert_allclose(y, x1 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_errors_from_the_core_name_the_problem():
    x = jnp.ones((6, 3))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        jbn.BatchNorm(axis=2).init(jax.random.key(0), x, use_running_average=True)
    bn = jbn.BatchNorm(use_running_average=False, virtual_batch_size=4)
    v = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide"):
        bn.apply(v, x, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="residual must be 'input' or 'output'"):
        jbn.BatchNorm(use_running_average=True, residual="none").init(jax.random.key(0), x)
    # An integer x is promoted as flax promotes it (issue 26): no error.
    xi = jnp.ones((6, 3), jnp.int32)
    vi = jbn.BatchNorm(use_running_average=True).init(jax.random.key(0), xi)
    assert jbn.BatchNorm(use_running_average=True).apply(vi, xi).dtype == jnp.float32


def test_bn_init_matches_flax_variables():
    x = jnp.ones((2, 4, 4, 3))
    v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    params, state = jbn.bn_init(3)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v["params"]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), params
    )
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v["batch_stats"]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )
    np.testing.assert_array_equal(params["scale"], v["params"]["scale"])
    np.testing.assert_array_equal(state["var"], v["batch_stats"]["var"])
    _, s = jbn.bn_init((2, 3), dtype=jnp.bfloat16, cumulative=True)
    assert (
        s["mean"].dtype == jnp.bfloat16
        and s["count"].dtype == jnp.int32
        and s["count"].shape == (2, 3)
    )
    assert (s["count"] == 0).all()


# --------------------------------------------------------------------------- #
# jbn's own options through the module.
# --------------------------------------------------------------------------- #


def test_cumulative_average_counts_batches():
    bn = jbn.BatchNorm(use_running_average=False, momentum=None, unbiased_running_var=True)
    xs = [3.0 * jax.random.normal(jax.random.key(i), (8, 3)) + i for i in range(3)]
    v = bn.init(jax.random.key(0), xs[0])
    assert v["batch_stats"]["count"].dtype == jnp.int32
    assert v["batch_stats"]["count"].shape == (3,) and (v["batch_stats"]["count"] == 0).all()
    for x in xs:
        _, upd = bn.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
    x64 = np.asarray(xs, np.float64)
    assert (v["batch_stats"]["count"] == 3).all()
    np.testing.assert_allclose(v["batch_stats"]["mean"], x64.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        v["batch_stats"]["var"], x64.var(axis=1, ddof=1).mean(axis=0), rtol=1e-5
    )


def test_output_residual_matches_input_residual():
    x = jax.random.normal(jax.random.key(0), (8, 4)) * 2 + 1
    bn_in = jbn.BatchNorm(use_running_average=False)
    bn_out = jbn.BatchNorm(use_running_average=False, residual="output", min_scale=1e-3)
    v = perturb_variables(bn_in.init(jax.random.key(1), x), 2)

    def grads(bn):
        f = lambda v, x: jnp.sum(jnp.sin(bn.apply(v, x, mutable=["batch_stats"])[0]))  # noqa: E731
        return jax.grad(f, (0, 1))(v, x)

    assert_trees_close(grads(bn_out), grads(bn_in), rtol=1e-4)


def test_renorm_bounds_per_call_follow_a_schedule_under_jit():
    bn = jbn.BatchNorm(renorm=True)
    x = jax.random.normal(jax.random.key(0), (16, 3)) * 3 + 2
    v = perturb_variables(bn.init(jax.random.key(1), x, use_running_average=False), 2)

    @jax.jit
    def step(v, x, rmax, dmax):
        return bn.apply(
            v, x, use_running_average=False, rmax=rmax, dmax=dmax, mutable=["batch_stats"]
        )

    plain = jbn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    assert_trees_close(step(v, x, 1.0, 0.0), plain)
    y_wide, _ = step(v, x, jnp.float32(1e6), jnp.float32(1e6))
    # Unclipped renorm is the running-statistics normalization in the forward pass.
    y_eval = bn.apply(v, x, use_running_average=True)
    np.testing.assert_allclose(y_wide, y_eval, rtol=1e-4, atol=1e-4)
    mean, var, _ = np_stats(x)
    assert not np.allclose(mean, v["batch_stats"]["mean"])  # the test is not vacuous
