"""Round 3 of the reliability issues on linen: TENT's bad batches, tools that find no batch
norm, integer inputs, errors in linen's terms, and the contexts around a function jitted outside."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
from jbn.linen import (
    Tent,
    frozen_batch_norms,
    intercept,
    recalibrate_batch_stats,
    use_prior,
    use_stream,
)
from tests.tent_checks import check_tent_skips_bad_batches


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.Dense(3)(jax.nn.relu(h))


X = 1.0 + jax.random.normal(jax.random.key(0), (8, 5))
NET = Net()
VARIABLES = NET.init(jax.random.key(1), X)
NO_BN = nn.Dense(3)
NO_BN_VARIABLES = NO_BN.init(jax.random.key(1), X)


def test_tent_skips_nan_and_inf_batches():
    tent = Tent(lambda v, x: NET.apply(v, x), VARIABLES, tx=optax.adam(1e-2))
    check_tent_skips_bad_batches(tent, X, lambda: tent.variables["params"])


@pytest.mark.parametrize(
    "context",
    [frozen_batch_norms, intercept, lambda: use_prior(4.0), lambda: use_stream(jbn.Stream())],
    ids=["frozen", "intercept", "prior", "stream"],
)
def test_contexts_refuse_a_model_without_batch_norm(context):
    with pytest.raises(ValueError, match="found no batch norm"):
        with context():
            NO_BN.apply(NO_BN_VARIABLES, X)
    with pytest.raises(ZeroDivisionError):  # the body's own error is not replaced
        with context():
            NO_BN.apply(NO_BN_VARIABLES, X)
            _ = 1 / 0


def test_tools_refuse_a_model_without_batch_norm():
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        Tent(lambda v, x: NO_BN.apply(v, x), NO_BN_VARIABLES)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate_batch_stats(NO_BN.apply, {**NO_BN_VARIABLES, "batch_stats": {}}, [X])


def test_integer_input_is_promoted_as_flax_does():
    xi = jnp.arange(40, dtype=jnp.int32).reshape(8, 5) % 7
    for module in (jbn.BatchNorm, nn.BatchNorm):
        for kwargs in ({}, {"param_dtype": jnp.bfloat16}):
            bn = module(use_running_average=False, **kwargs)
            v = bn.init(jax.random.key(0), xi)
            want, _ = nn.BatchNorm(use_running_average=False, **kwargs).apply(
                v, xi, mutable=["batch_stats"]
            )
            ctx = intercept() if module is nn.BatchNorm else warnings.catch_warnings()
            with ctx:
                y, up = bn.apply(v, xi, mutable=["batch_stats"])
                yf, upf = bn.apply(v, xi.astype(jnp.float32), mutable=["batch_stats"])
            assert y.dtype == want.dtype  # flax's: float32, or bfloat16 from the params
            np.testing.assert_array_equal(y, yf.astype(y.dtype))
            np.testing.assert_allclose(y.astype(float), want.astype(float), atol=2e-2)
            assert_same = jax.tree.map(np.testing.assert_array_equal, up, upf)
            del assert_same


def test_wrong_feature_size_suggests_the_axis():
    v = jbn.BatchNorm(use_running_average=True).init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"feature axis -1 has size\(s\) \(4,\).*pass axis=1"):
        jbn.BatchNorm(use_running_average=True).apply(v, jnp.ones((2, 3, 4, 4)))


# --- the contexts around a function jitted outside them --------------------------------

BN = nn.BatchNorm(use_running_average=False, momentum=0.9)
SHIFTED = 1e4 + jax.random.normal(jax.random.key(2), (64, 4))
BN_VARIABLES = BN.init(jax.random.key(3), SHIFTED)


@pytest.fixture(scope="module")
def traced_outside():
    traces = []

    @jax.jit
    def f(v, x):
        traces.append(1)
        return BN.apply(v, x, mutable=["batch_stats"])[0]

    f(BN_VARIABLES, SHIFTED)  # traced, with flax's batch norm
    return f, traces


@pytest.mark.parametrize(
    "context, want",
    [
        (intercept, lambda y: abs(float(y.std()) - 1.0) < 1e-3),  # flax's is far from 1 here
        (frozen_batch_norms, lambda y: np.allclose(y, SHIFTED / np.sqrt(1 + 1e-5))),
        (lambda: use_prior(float("inf")), lambda y: np.allclose(y, SHIFTED / np.sqrt(1 + 1e-5))),
    ],
    ids=["intercept", "frozen_batch_norms", "use_prior"],
)
def test_a_function_jitted_outside_is_traced_anew_inside(traced_outside, context, want):
    f, traces = traced_outside
    outside = f(BN_VARIABLES, SHIFTED)
    assert not want(outside)  # flax's batch norm ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = len(traces)
        with context():
            inside = f(BN_VARIABLES, SHIFTED)
        with context():  # the same settings: jit's cache, no new trace
            again = f(BN_VARIABLES, SHIFTED)
    assert want(inside)
    assert len(traces) == n + 1
    np.testing.assert_array_equal(inside, again)
    np.testing.assert_array_equal(f(BN_VARIABLES, SHIFTED), outside)  # and flax's again after


def test_new_settings_trace_anew(traced_outside):
    f, traces = traced_outside
    n = len(traces)
    with use_prior(0.0):
        batch = f(BN_VARIABLES, SHIFTED)
    with use_prior(jnp.float32(0.0)):  # the same prior as an array: the same program
        np.testing.assert_array_equal(f(BN_VARIABLES, SHIFTED), batch)
    with use_prior(1e12):
        running = f(BN_VARIABLES, SHIFTED)
    assert len(traces) == n + 2
    assert abs(float(batch.std()) - 1.0) < 1e-2
    np.testing.assert_allclose(running, SHIFTED / np.sqrt(1 + 1e-5), rtol=1e-5)
