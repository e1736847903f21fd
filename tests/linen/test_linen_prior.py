"""jbn.linen.use_prior() and jbn.linen.Tent on a flax ResNet it did not build.

The reference is a plain jnp batch norm with prior-weighted statistics, written
here as a linen module with flax's variable names, put in the same ResNet.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
from jbn.linen import Tent, intercept, use_prior


class RefPriorBN(nn.Module):
    """flax's BatchNorm variables; y with prior-weighted statistics in plain jnp."""

    prior: float = 0.0
    form: str = "pooled"
    use_running_average: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    use_fast_variance: bool = True
    axis_name: Any = None
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        rm = self.variable("batch_stats", "mean", jnp.zeros, (c,)).value
        rv = self.variable("batch_stats", "var", jnp.ones, (c,)).value
        axes = tuple(range(x.ndim - 1))
        return self.formula(x, scale, bias, rm, rv, axes)

    def formula(self, x, scale, bias, rm, rv, axes):
        c = x.shape[-1]
        rm, rv, scale, bias = (v.reshape((1,) * (x.ndim - 1) + (c,)) for v in (rm, rv, scale, bias))
        mb = x.mean(axes, keepdims=True)
        vb = ((x - mb) ** 2).mean(axes, keepdims=True)
        n = x.shape[0]  # examples
        w = self.prior / (self.prior + n) if np.isfinite(self.prior) else 1.0
        mean = w * rm + (1 - w) * mb
        var = w * rv + (1 - w) * vb
        if self.form == "pooled":
            var = var + w * (1 - w) * (rm - mb) ** 2
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class Block(nn.Module):
    features: int
    strides: int
    norm: Any

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = self.norm(name="bn2")(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.features, (1, 1), (self.strides, self.strides))(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """A small ResNet as flax's examples write it, with flax.linen.BatchNorm (or ``norm``)."""

    norm: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = self.norm or functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, use_fast_variance=False
        )
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(norm(name="bn_init")(x))
        for i, (features, strides) in enumerate([(4, 1), (8, 2)]):
            x = Block(features, strides, norm, name=f"block{i}")(x)
        x = norm(name="bn_head")(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(3)(x)


X = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
MODEL = ResNet()
VARIABLES = helpers.perturb_variables(MODEL.init(jax.random.key(1), X[:2]), std=0.3)


def reference(prior, form="pooled", x=X):
    model = ResNet(norm=functools.partial(RefPriorBN, prior=prior, form=form))
    return model.apply(VARIABLES, x)


@pytest.mark.parametrize("adopted,form", [(False, "linear"), (True, "pooled")])
def test_use_prior_matches_reference_on_flax_resnet(adopted, form):
    @jax.jit
    def run(variables, x, prior):
        with intercept() if adopted else use_prior(None), use_prior(prior, prior_form=form):
            return MODEL.apply(variables, x, train=True, mutable=["batch_stats"])

    for prior in (0.0, 3.0, np.inf):
        y, updates = run(VARIABLES, X, prior)
        np.testing.assert_allclose(y, reference(prior, form), rtol=2e-4, atol=2e-4)
        # Nothing updated, though the model asked for training mode.
        helpers.assert_trees_close(updates["batch_stats"], VARIABLES["batch_stats"], rtol=0)


def compiled_eval():
    """A new jit of the model in evaluation mode, traced under the contexts open at its first call.

    A context joins jit's cache key, so op by op every op would compile anew under it.
    """
    return jax.jit(lambda variables, x: MODEL.apply(variables, x))


def test_zero_and_inf_are_flax_training_and_evaluation():
    train, _ = MODEL.apply(VARIABLES, X, train=True, mutable=["batch_stats"])
    evaluation = MODEL.apply(VARIABLES, X)
    with use_prior(0):
        np.testing.assert_allclose(compiled_eval()(VARIABLES, X), train, rtol=1e-4, atol=1e-4)
    with use_prior(np.inf):
        y = compiled_eval()(VARIABLES, X)
        np.testing.assert_allclose(y, evaluation, rtol=1e-5, atol=1e-5)


def test_one_image_at_a_time():
    with use_prior(16):
        apply = compiled_eval()  # one compilation for the three images
        one = jnp.concatenate([apply(VARIABLES, X[i : i + 1]) for i in range(3)])
    want = jnp.concatenate([reference(16.0, x=X[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(one, want, rtol=2e-4, atol=2e-4)
    assert bool(jnp.all(jnp.isfinite(one)))


def test_where_none_and_nesting_take_layers_out():
    evaluation = MODEL.apply(VARIABLES, X)
    with use_prior(4.0, where=lambda path: False):
        np.testing.assert_allclose(compiled_eval()(VARIABLES, X), evaluation, rtol=1e-6, atol=1e-6)
    with use_prior(4.0), use_prior(None):
        np.testing.assert_allclose(compiled_eval()(VARIABLES, X), evaluation, rtol=1e-6, atol=1e-6)
    # Only the head adapts: the same as the reference with only the head's statistics pooled.
    with use_prior(0.0, where=lambda path: path[-1] == "bn_head"):
        head_only = compiled_eval()(VARIABLES, X)
    assert not np.allclose(head_only, evaluation, atol=1e-3)
    assert not np.allclose(head_only, reference(0.0), atol=1e-3)
    # Outside the context the model is as before.
    np.testing.assert_array_equal(MODEL.apply(VARIABLES, X), evaluation)


def test_jbn_batch_norm_field_and_context_agree():
    model = ResNet(norm=functools.partial(jbn.BatchNorm, use_running_average=False, prior=3.0))
    y, updates = model.apply(VARIABLES, X, mutable=["batch_stats"])
    np.testing.assert_allclose(y, reference(3.0), rtol=2e-4, atol=2e-4)
    helpers.assert_trees_close(updates["batch_stats"], VARIABLES["batch_stats"], rtol=0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prior=-1.0), ValueError, "prior must be >= 0"),
        (dict(prior=1.0, prior_form="paper"), ValueError, "prior_form must be one of"),
        (dict(prior=1.0, where="bn_head"), TypeError, "where must be a predicate"),
    ],
)
def test_use_prior_errors(kwargs, error, match):
    with pytest.raises(error, match=match), use_prior(**kwargs):
        pass


def apply_eval(variables, x):
    return MODEL.apply(variables, x)


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_tent_moves_only_batch_norm_parameters_and_lowers_entropy():
    tent = Tent(apply_eval, VARIABLES, tx=optax.adam(1e-2))
    mask = jbn.linen.batch_norm_mask(VARIABLES)
    entropies = []
    for _ in range(5):
        tent.update(X)
        entropies.append(float(tent.loss))
    assert entropies[-1] < entropies[0]
    flags = jax.tree.leaves(mask)
    moved = 0
    for (path, a), b, bn in zip(
        _leaves(VARIABLES["params"]), jax.tree.leaves(tent.variables["params"]), flags, strict=True
    ):
        if bn:
            moved += not np.array_equal(a, b)
        else:  # bit-identical
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    assert moved == sum(flags)
    assert tent.variables["batch_stats"] is VARIABLES["batch_stats"]
    # Offline prediction is the reference with the adapted parameters.
    with use_prior(0.0):
        np.testing.assert_allclose(tent.predict(X), apply_eval(tent.variables, X), rtol=1e-5)
    tent.reset()
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(tent.params), jax.tree.leaves(VARIABLES["params"]), strict=True
        )
    )


@pytest.mark.slow  # three Tents, each compiled: ~20 s on 2 idle cores
def test_tent_online_episodic_and_prior():
    online = Tent(apply_eval, VARIABLES, prior=4.0)
    logits = online.step(X)
    with use_prior(4.0):
        np.testing.assert_allclose(logits, apply_eval(online.variables, X), rtol=1e-5)
    episodic = Tent(apply_eval, VARIABLES, prior=4.0, episodic=True)
    first = episodic.step(X)
    second = episodic.step(X)  # reset first: the same step again
    np.testing.assert_allclose(first, second, rtol=1e-6)
    np.testing.assert_allclose(first, logits, rtol=1e-6)
    offline = Tent(apply_eval, VARIABLES, tx=optax.sgd(1e-2))
    offline.adapt([X[:2], X[2:]], epochs=2)
    assert offline.opt_state is not None


def test_tent_errors():
    with pytest.raises(TypeError, match="tx must be an optax"):
        Tent(apply_eval, VARIABLES, tx="adam")
    with pytest.raises(ValueError, match="prior must be >= 0"):
        Tent(apply_eval, VARIABLES, prior=-2.0)
    with pytest.raises(ValueError, match="batch_stats"):
        Tent(apply_eval, {"params": VARIABLES["params"]})
    with pytest.raises(ValueError, match="epochs must be"):
        Tent(apply_eval, VARIABLES).adapt([X], epochs=0)


def apply_mutable(variables, x):
    return MODEL.apply(variables, x, train=False, mutable=["batch_stats"])


def test_tent_with_the_stream_statistics():
    stream = jbn.Stream(50.0, 8.0)
    tent = Tent(apply_mutable, VARIABLES, tx=optax.adam(1e-2), stream=stream)
    start = tent.variables["batch_stats"]
    tent.update(X)
    # The step's forward ran the source parameters in the stream mode: its memory is the step's.
    # One compilation of the model in the stream mode (traced under the context) for both checks.
    with jbn.linen.use_stream(stream):
        streaming = jax.jit(apply_mutable)
        _, want = streaming({**VARIABLES, "batch_stats": start}, X)
    for got, ref in zip(
        jax.tree.leaves(tent.variables["batch_stats"]),
        jax.tree.leaves(want["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    moved = tent.variables
    logits = tent.predict(X)  # predicting keeps the memory
    with jbn.linen.use_stream(stream):
        np.testing.assert_allclose(logits, streaming(moved, X)[0], rtol=1e-5, atol=1e-5)
    assert tent.carry is moved["batch_stats"]
    tent.reset()
    for a, b in zip(jax.tree.leaves(tent.carry), jax.tree.leaves(start), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(ValueError, match="not both"):
        Tent(apply_mutable, VARIABLES, prior=4.0, stream=stream)
    with pytest.raises(TypeError, match="jbn.Stream"):
        Tent(apply_mutable, VARIABLES, stream=50.0)
    with pytest.raises(ValueError, match=r"pass mutable=\['batch_stats'\]"):
        Tent(apply_eval, VARIABLES, stream=stream).update(X)
