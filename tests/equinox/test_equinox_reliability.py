"""Round 3 of the reliability issues on Equinox: TENT's bad batches, tools that find no batch
norm, integer inputs and errors in Equinox's terms."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn.equinox
from tests.tent_checks import check_tent_skips_bad_batches

X = 1.0 + jax.random.normal(jax.random.key(0), (8, 5))


class Net(eqx.Module):
    linear: eqx.nn.Linear
    bn: jbn.equinox.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(5, 4, key=k1)
        self.bn = jbn.equinox.BatchNorm(4, "batch")
        self.head = eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.linear(x), state)
        return self.head(jax.nn.relu(h)), state


def train(layer, state, x):
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


def test_tent_skips_nan_and_inf_batches():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(1))
    tent = jbn.equinox.Tent(model, state, tx=optax.adam(1e-2))
    check_tent_skips_bad_batches(tent, X)


NO_BN = eqx.nn.Sequential([eqx.nn.Linear(5, 4, key=jax.random.key(0))])


@pytest.mark.parametrize(
    "tool, name",
    [
        (lambda m: jbn.equinox.use_prior(m, 4.0), "use_prior"),
        (lambda m: jbn.equinox.use_prior(m, None), "use_prior"),
        (lambda m: jbn.equinox.Tent(m, eqx.nn.State(m)), "Tent"),
        (lambda m: jbn.equinox.convert(m, eqx.nn.State(m)), "convert"),
    ],
)
def test_tools_refuse_a_model_without_batch_norm(tool, name):
    with pytest.raises(ValueError, match=f"jbn.equinox.{name} found no batch norm in the model"):
        tool(NO_BN)


def test_integer_input_is_promoted_as_flax_does():
    xi = jnp.arange(40, dtype=jnp.int32).reshape(8, 5) % 7
    bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(5, "batch")
    (y, new), (yf, newf) = train(bn, state, xi), train(bn, state, xi.astype(jnp.float32))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, yf)
    jax.tree.map(np.testing.assert_array_equal, new, newf)
    eqx_bn, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(5, "batch", mode="batch")
    np.testing.assert_allclose(y, train(eqx_bn, eqx_state, xi)[0], atol=1e-5)


def test_errors_speak_equinox_terms():
    bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(8, "batch")
    match = (
        r"jbn.equinox.BatchNorm\(input_size=8\) in training needs more than 1 value per "
        r"feature \(channel\), but got a batch of 1 example\(s\) of shape \(8,\)"
    )
    with pytest.raises(ValueError, match=match):
        train(bn, state, jnp.ones((1, 8)))
    with pytest.raises(ValueError, match=r"x has shape \(3,\), but .*input_size=8"):
        train(bn, state, jnp.ones((4, 3)))
    bad = eqx.tree_at(lambda b: b.weight, bn, jnp.ones(3))
    with pytest.raises(ValueError, match=r"input_size=8\) has a weight of shape \(3,\)"):
        train(bad, state, jnp.ones((4, 8)))
    with pytest.raises(ValueError, match=r"mask of shape \(2,\) does not broadcast to x"):
        jax.vmap(lambda x: bn(x, state, mask=jnp.ones(2, bool)), axis_name="batch")(
            jnp.ones((4, 8))
        )
    one = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None), out_axes=(0, None))
    assert one(jnp.ones((1, 8)), state)[0].shape == (1, 8)  # inference takes a batch of one


NO_BN_REFUSED = r"(found|holds|ran) no (batch norm|jbn\.equinox\.(Frozen)?BatchNorm)"


@pytest.mark.parametrize(
    "tool",
    [
        jbn.equinox.batch_norm_mask,
        jbn.equinox.freeze_batch_norms,
        jbn.equinox.unfreeze_batch_norms,
        lambda m: jbn.equinox.use_stream(m, eqx.nn.State(m), jbn.Stream()),
        lambda m: jbn.equinox.recalibrate_batch_stats(m, eqx.nn.State(m), [X]),
        lambda m: jbn.equinox.fold_batch_norms(m, eqx.nn.State(m), X),
        lambda m: jbn.equinox.sync_batch_stats([eqx.nn.State(m)] * 2),
    ],
    ids=["mask", "freeze", "unfreeze", "stream", "recalibrate", "fold", "sync"],
)
def test_the_toolbox_refuses_a_model_without_batch_norm(tool):
    with pytest.raises(ValueError, match=NO_BN_REFUSED):
        tool(NO_BN)
