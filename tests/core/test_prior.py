"""Prior-weighted statistics (test-time adaptation): ``bn_forward(..., train=False, prior=N)``.

References: NumPy float64 transcriptions of the pooled (Chan) and linear (Schneider
et al. 2020) statistics, and a plain jnp transcription for the gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jbn
from tests.np_reference import np_eval, np_prior

PRIORS = (0.0, 1.0, 4.5, 64.0, math.inf)


def setup(shape, axis, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    axes = (axis,) if isinstance(axis, int) else axis
    fshape = tuple(shape[a] for a in axes)
    x = rng.normal(1.5, 2.0, shape).astype(np.float32)
    params = {
        "scale": rng.normal(1.0, 0.3, fshape).astype(np.float32),
        "bias": rng.normal(0.0, 0.3, fshape).astype(np.float32),
    }
    state = {
        "mean": rng.normal(0.0, 1.0, fshape).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, fshape).astype(np.float32),
    }
    return jnp.asarray(x, dtype), params, state


LAYOUTS = [((6, 5), -1), ((3, 4, 4, 5), -1), ((3, 5, 4, 4), 1), ((2, 3, 3, 4), (1, 2, 3))]


@pytest.mark.parametrize("form", ["pooled", "linear"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_matches_numpy(shape, axis, form):
    x, params, state = setup(shape, axis)
    for prior in PRIORS:
        y, new = jbn.bn_forward(params, state, x, False, axis=axis, prior=prior, prior_form=form)
        want = np_prior(
            x, params["scale"], params["bias"], state["mean"], state["var"], prior, form, axis
        )
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5, err_msg=f"prior={prior}")
        # The running statistics are returned as they were.
        for k in ("mean", "var"):
            np.testing.assert_array_equal(new[k], state[k])


@pytest.mark.parametrize("form", ["pooled", "linear"])
def test_mask_and_one_example(form):
    x, params, state = setup((4, 3, 3, 5), -1, seed=1)
    mask = np.ones((4, 3, 3, 1), bool)
    mask[1:] = False  # one counted example
    mask[0, 0, 0] = False
    x = x.at[2].set(jnp.nan)  # padding, whatever its values, stays out
    for prior in PRIORS[1:]:
        y, _ = jbn.bn_forward(params, state, x, False, mask=mask, prior=prior, prior_form=form)
        want = np_prior(
            np.where(mask, x, 0.0), params["scale"], params["bias"], state["mean"],
            state["var"], prior, form, mask=mask,
        )  # fmt: skip
        np.testing.assert_allclose(y[mask[..., 0]], want[mask[..., 0]], rtol=2e-5, atol=2e-5)
    # A fully masked batch normalizes with the running statistics alone.
    y, _ = jbn.bn_forward(params, state, x[:1], False, mask=False, prior=1.0)
    want = np_eval(x[:1], params["scale"], params["bias"], state["mean"], state["var"])
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


def test_single_example_with_prior_is_finite_and_distinct():
    # Batch size 1: every feature of a dense layer has one value. N > 0 keeps
    # a variance from the running statistics, so two inputs give two outputs.
    _, params, state = setup((1, 5), -1)
    a = jnp.arange(5.0)[None]
    b = -a
    ya, _ = jbn.bn_forward(params, state, a, False, prior=1.0)
    yb, _ = jbn.bn_forward(params, state, b, False, prior=1.0)
    assert bool(jnp.all(jnp.isfinite(ya))) and not bool(jnp.allclose(ya, yb))
    want = np_prior(a, params["scale"], params["bias"], state["mean"], state["var"], 1.0, "pooled")
    np.testing.assert_allclose(ya, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape,axis", LAYOUTS[1:3])
def test_zero_prior_is_training_and_inf_prior_is_evaluation(shape, axis):
    x, params, state = setup(shape, axis, seed=2)
    y_train, _ = jbn.bn_forward(params, state, x, True, axis=axis)
    y_eval, _ = jbn.bn_forward(params, state, x, False, axis=axis)
    for form in ("pooled", "linear"):
        y0, _ = jbn.bn_forward(params, state, x, False, axis=axis, prior=0, prior_form=form)
        yinf, _ = jbn.bn_forward(params, state, x, False, axis=axis, prior=jnp.inf, prior_form=form)
        np.testing.assert_allclose(y0, y_train, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(yinf, y_eval, rtol=1e-6, atol=1e-6)


def test_traced_prior_under_jit_and_vmap():
    x, params, state = setup((6, 5), -1, seed=3)
    f = jax.jit(lambda n: jbn.bn_forward(params, state, x, False, prior=n)[0])
    ys = jax.vmap(f)(jnp.asarray([0.0, 4.0, jnp.inf]))
    for y, prior in zip(ys, (0.0, 4.0, math.inf), strict=True):
        want = np_prior(
            x, params["scale"], params["bias"], state["mean"], state["var"], prior, "pooled"
        )
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    x, params, state = setup((8, 4, 4, 6), -1, seed=4)
    y, _ = jbn.bn_forward(params, state, x.astype(dtype), False, prior=4.0)
    assert y.dtype == dtype
    want = np_prior(x.astype(dtype).astype(np.float32), params["scale"], params["bias"],
                    state["mean"], state["var"], 4.0, "pooled")  # fmt: skip
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


def plain_reference(params, state, x, prior, form, mask=None, axis=-1, eps=1e-5):
    """Prior-weighted batch norm in plain jnp (two-pass statistics), for jax.grad."""
    axes = (axis % x.ndim,) if isinstance(axis, int) else axis
    red = tuple(a for a in range(x.ndim) if a not in axes)
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    n = jnp.sum(m, red, keepdims=True).astype(x.dtype)
    examples = n / math.prod(x.shape[a] for a in red if a != 0)
    mean_b = jnp.sum(jnp.where(m, x, 0), red, keepdims=True) / n
    var_b = jnp.sum(jnp.where(m, (x - mean_b) ** 2, 0), red, keepdims=True) / n
    bshape = mean_b.shape
    rm, rv = state["mean"].reshape(bshape), state["var"].reshape(bshape)
    w = prior / (prior + examples)
    mean = w * rm + (1 - w) * mean_b
    var = w * rv + (1 - w) * var_b
    if form == "pooled":
        var = var + w * (1 - w) * (rm - mean_b) ** 2
    s, b = params["scale"].reshape(bshape), params["bias"].reshape(bshape)
    return s * (x - mean) / jnp.sqrt(var + eps) + b


@pytest.mark.parametrize("form", ["pooled", "linear"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_plain_reference_in_float64(form, masked):
    with jax.enable_x64(True):
        x, params, state = setup((5, 3, 4), -1, seed=5, dtype=jnp.float64)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
        mask = None
        if masked:
            mask = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 3, 1)) < 0.7)
        dy = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)

        def loss(fn):
            return lambda p, x: jnp.sum(dy * fn(p, x))

        def ours(p, x):
            return jbn.bn_forward(p, state, x, False, mask=mask, prior=3.0, prior_form=form)[0]

        def ref(p, x):
            return plain_reference(p, state, x, 3.0, form, mask)

        g = jax.grad(loss(ours), argnums=(0, 1))(params, x)
        g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        check_grads(ours, (params, x), order=2, modes=["rev"])


def test_running_statistics_get_no_gradient():
    x, params, state = setup((6, 5), -1, seed=6)

    def f(state):
        return jnp.sum(jbn.bn_forward(params, state, x, False, prior=2.0)[0] ** 2)

    g = jax.grad(f)(state)
    assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(g))


@pytest.mark.parametrize("form", ["pooled", "linear"])
def test_four_devices_unequal_counts_match_numpy(four_devices, form):
    x, params, state = setup((16, 3, 5), -1, seed=7)
    rng = np.random.default_rng(8)
    mask = rng.uniform(size=(16, 3, 1)) < 0.5
    mask[4:8] = False  # device 1 has no counted value at all
    mask[0, 0, 0] = True
    mesh = Mesh(np.array(four_devices), ("data",))

    def per_device(x, m):
        return jbn.bn_forward(
            params, state, x, False, mask=m, axis_name="data", prior=6.0, prior_form=form
        )[0]

    f = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    )
    y = f(x, jnp.asarray(mask))
    want = np_prior(np.where(mask, x, 0.0), params["scale"], params["bias"], state["mean"],
                    state["var"], 6.0, form, mask=mask)  # fmt: skip
    keep = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(np.asarray(y)[keep], want[keep], rtol=2e-5, atol=2e-5)
    # The gradient through the synchronized statistics equals the one-device gradient.
    dy = jax.random.normal(jax.random.key(2), x.shape)

    def loss_sharded(x):
        return jnp.sum(dy * f(x, jnp.asarray(mask)))

    def loss_one(x):
        return jnp.sum(
            dy * jbn.bn_forward(params, state, x, False, mask=mask, prior=6.0, prior_form=form)[0]
        )

    np.testing.assert_allclose(
        jax.grad(loss_sharded)(x), jax.grad(loss_one)(x), rtol=1e-4, atol=1e-5
    )


def test_pmap_matches_one_device(four_devices):
    x, params, state = setup((8, 5), -1, seed=9)
    f = jax.pmap(
        lambda x: jbn.bn_forward(params, state, x, False, axis_name="b", prior=2.0)[0],
        axis_name="b",
        devices=four_devices,
    )
    y = f(x.reshape(4, 2, 5)).reshape(8, 5)
    want = np_prior(x, params["scale"], params["bias"], state["mean"], state["var"], 2.0, "pooled")
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


def test_complex_input():
    x = jax.random.normal(jax.random.key(0), (6, 3)) + 1j * jax.random.normal(
        jax.random.key(1), (6, 3)
    )
    state = {"mean": jnp.zeros(3, jnp.complex64), "var": jnp.ones(3)}
    y, _ = jbn.bn_forward(None, state, x, False, prior=6.0)
    mean_b = x.mean(0, keepdims=True)
    var_b = jnp.mean(jnp.abs(x - mean_b) ** 2, 0, keepdims=True)
    mean = 0.5 * mean_b
    var = 0.5 * 1.0 + 0.5 * var_b + 0.25 * jnp.abs(mean_b) ** 2
    np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(train=True, prior=1.0), ValueError, "train=False"),
        (dict(prior=-1.0), ValueError, "prior must be >= 0"),
        (dict(prior=math.nan), ValueError, "prior must be >= 0"),
        (dict(prior="4"), TypeError, "prior must be a number"),
        (dict(prior=True), TypeError, "prior must be a number"),
        (dict(prior=jnp.ones(2)), ValueError, "prior must be a scalar"),
        (dict(prior=1.0, prior_form="mixed"), ValueError, "prior_form must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, params, state = setup((4, 3), -1)
    train = kwargs.pop("train", False)
    with pytest.raises(error, match=match):
        jbn.bn_forward(params, state, x, train, **kwargs)


def test_unbound_axis_name_is_a_clear_error():
    x, params, state = setup((4, 3), -1)
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        jbn.bn_forward(params, state, x, False, axis_name="data", prior=1.0)
