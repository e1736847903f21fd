"""Modules that look like batch norms but are not flax's: a warning naming them, once.

intercept() (and the other linen tools) change flax.linen.BatchNorm, its
subclasses and jbn.BatchNorm only. A home-made batch norm runs unchanged: the
tools warn once per class, and a model with nothing else is refused by name.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn.linen import InterceptWarning


def _home_made_batch_norm():
    """A fresh class each time (the warning comes once per class), named as a zoo names it."""

    class HomeBN(nn.Module):
        """A batch norm written from scratch: its own batch_stats, no flax BatchNorm."""

        @nn.compact
        def __call__(self, x):
            c = x.shape[-1]
            mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
            var = self.variable("batch_stats", "var", jnp.ones, (c,))
            axes = tuple(range(x.ndim - 1))
            mu, sigma2 = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
            if not self.is_initializing():
                mean.value = 0.9 * mean.value + 0.1 * mu.reshape(c)
                var.value = 0.9 * var.value + 0.1 * sigma2.reshape(c)
            return (x - mu) / jnp.sqrt(sigma2 + 1e-5)

    return HomeBN


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, InterceptWarning)]


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 3)], ids=["dense", "nhwc"])
def test_mixed_model_warns_once_and_still_intercepts_flax(shape):
    home = _home_made_batch_norm()

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=False, momentum=0.9)(x)
            return home()(x)

    model = Mixed()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 2 + 1

    # unbiased_running_var: jbn's option, so flax's layer visibly ran through jbn.
    @jbn.linen.intercept(unbiased_running_var=True)
    def run(v):
        return model.apply(v, x, mutable=["batch_stats"])

    def go():
        v = jbn.linen.intercept()(model.init)(jax.random.key(0), x)
        outs = [run(v) for _ in range(2)]
        return v, outs + [jax.jit(run)(v)]

    (variables, outs), caught = _caught(go)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"{home.__module__}.{home.__qualname__}" in message
    assert "jbn.linen.intercept leaves" in message and "unchanged" in message

    axes = tuple(range(len(shape) - 1))
    x64 = x.astype(np.float64)
    xn = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(
        x64.var(axes, keepdims=True) + 1e-5
    )  # flax's BN: scale 1, bias 0
    for y, updates in outs:
        stats = updates["batch_stats"]
        # flax's layer, through jbn: Bessel-corrected running variance (flax has no such option)
        np.testing.assert_allclose(
            stats["BatchNorm_0"]["var"], 0.9 + 0.1 * x64.var(axes, ddof=1), rtol=1e-5
        )
        np.testing.assert_allclose(
            stats["BatchNorm_0"]["mean"], 0.1 * x64.mean(axes), rtol=1e-5, atol=1e-6
        )
        # the home-made one, unchanged: its own biased variance of flax's normalized output
        np.testing.assert_allclose(stats["HomeBN_0"]["var"], 0.9 + 0.1 * xn.var(axes), rtol=1e-4)
        want = (xn - xn.mean(axes, keepdims=True)) / np.sqrt(xn.var(axes, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, want, atol=1e-4)


def test_other_tools_warn_too_once_each():
    home = _home_made_batch_norm()
    model = nn.Sequential([nn.BatchNorm(use_running_average=True), home()])
    x = jnp.arange(12.0).reshape(4, 3)
    variables = model.init(jax.random.key(0), x)

    def go():
        for _ in range(2):
            with jbn.linen.use_prior(4.0):
                model.apply(variables, x, mutable=["batch_stats"])
            with jbn.linen.frozen_batch_norms():
                model.apply(variables, x, mutable=["batch_stats"])

    _, caught = _caught(go)
    tools = sorted(str(w.message).split(" leaves ")[0] for w in caught)
    assert tools == ["jbn.linen.frozen_batch_norms", "jbn.linen.use_prior"]
    assert all(home.__qualname__ in str(w.message) for w in caught)


def test_no_warning_for_flax_models_and_wrappers_named_like_batch_norms():
    class ConvBatchNorm(nn.Module):  # a block around flax's layer: not a lookalike
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Conv(2, (1, 1))(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(ConvBatchNorm()(x).mean((1, 2)))

    x = jnp.ones((2, 3, 3, 1)) + jnp.arange(2.0)[:, None, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InterceptWarning)
        with jbn.linen.intercept():
            variables = Net().init(jax.random.key(0), x)
            Net().apply(variables, x, mutable=["batch_stats"])


def test_named_lookalike_without_batch_stats_warns():
    class MyBatchNormalization(nn.Module):  # keeps its statistics in another collection
        @nn.compact
        def __call__(self, x):
            self.variable("moving", "mean", jnp.zeros, x.shape[-1:])
            return x - x.mean(0, keepdims=True)

    model = nn.Sequential([nn.BatchNorm(use_running_average=True), MyBatchNormalization()])
    x = jnp.arange(6.0).reshape(2, 3)
    variables = model.init(jax.random.key(0), x)  # flax's own init: the same variables
    with (
        pytest.warns(InterceptWarning, match="MyBatchNormalization unchanged"),
        jbn.linen.intercept(),
    ):
        model.apply(variables, x)


def test_only_a_lookalike_is_refused_by_name():
    home = _home_made_batch_norm()
    x = jnp.arange(6.0).reshape(2, 3)
    with (
        pytest.raises(ValueError, match=r"found no batch norm.*HomeBN looks like a batch norm"),
        warnings.catch_warnings(),
        jbn.linen.intercept(),
    ):
        warnings.simplefilter("ignore", InterceptWarning)
        home().init(jax.random.key(0), x)
