"""Round 3 of the reliability issues on NNX: TENT's bad batches, tools that find no batch
norm, integer inputs and errors in NNX's terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jbn.nnx
from tests.tent_checks import check_tent_skips_bad_batches

X = 1.0 + jax.random.normal(jax.random.key(0), (8, 5))


def net():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(
        nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)
    )


def test_tent_skips_nan_and_inf_batches():
    model = net()
    tent = jbn.nnx.Tent(model, tx=optax.adam(1e-2))
    check_tent_skips_bad_batches(tent, X, lambda: nnx.as_pure(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "tool, name",
    [
        (lambda m: jbn.nnx.use_prior(m, 4.0), "use_prior"),
        (lambda m: jbn.nnx.use_prior(m, None), "use_prior"),
        (lambda m: jbn.nnx.Tent(m), "Tent"),
        (jbn.nnx.freeze_batch_norms, "freeze_batch_norms"),
        (jbn.nnx.unfreeze_batch_norms, "unfreeze_batch_norms"),
        (jbn.nnx.convert, "convert"),
        (lambda m: jbn.nnx.convert(m, to="flax"), "convert"),
    ],
)
def test_tools_refuse_a_model_without_batch_norm(tool, name):
    model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu)
    before = nnx.state(model)
    with pytest.raises(ValueError, match=f"jbn.nnx.{name} found no batch norm in the model"):
        tool(model)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_recalibrate_refuses_a_model_without_batch_norm():
    model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="contains no jbn.nnx.BatchNorm"):
        jbn.nnx.recalibrate_batch_stats(model, [X])


@pytest.mark.parametrize("kwargs", [{}, {"param_dtype": jnp.bfloat16}, {"dtype": jnp.bfloat16}])
def test_integer_input_is_promoted_as_flax_does(kwargs):
    xi = jnp.arange(40, dtype=jnp.int32).reshape(8, 5) % 7
    for use_running_average in (False, True):
        flax_bn = nnx.BatchNorm(
            5, use_running_average=use_running_average, rngs=nnx.Rngs(0), **kwargs
        )
        ours = jbn.nnx.BatchNorm(
            5, use_running_average=use_running_average, rngs=nnx.Rngs(0), **kwargs
        )
        twin = jbn.nnx.BatchNorm(
            5, use_running_average=use_running_average, rngs=nnx.Rngs(0), **kwargs
        )
        want, y, yf = flax_bn(xi), ours(xi), twin(xi.astype(jnp.float32))
        assert y.dtype == want.dtype == yf.dtype
        np.testing.assert_array_equal(y, yf)
        np.testing.assert_allclose(y.astype(float), want.astype(float), atol=2e-2)
        np.testing.assert_array_equal(ours.mean[...], twin.mean[...])


def test_errors_speak_nnx_terms():
    bn = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    match = r"jbn.nnx.BatchNorm\(num_features=3, axis=-1\) got x of shape \(8, 3, 4, 4\).*axis=1"
    with pytest.raises(ValueError, match=match):
        bn(jnp.ones((8, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \(8, 2\) does not broadcast to x of"):
        bn(jnp.ones((8, 3)), mask=jnp.ones((8, 2), bool))
    with pytest.raises(ValueError, match=r"more than 1 value per feature.*shape \(1, 3\)"):
        bn(jnp.ones((1, 3)))


@pytest.mark.parametrize(
    "tool",
    [
        jbn.nnx.batch_norm_mask,
        lambda m: jbn.nnx.use_stream(m, jbn.Stream()),
        lambda m: jbn.nnx.recalibrate_batch_stats(m, [jnp.ones((4, 5))]),
        lambda m: jbn.nnx.fold_batch_norms(m, jnp.ones((4, 5))),
        lambda m: jbn.nnx.sync_batch_stats([m, m]),
    ],
    ids=["mask", "stream", "recalibrate", "fold", "sync"],
)
def test_the_toolbox_refuses_a_model_without_batch_norm(tool):
    model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu)
    before = nnx.state(model)
    with pytest.raises(
        ValueError, match=r"(found|ran|contains|holds) no (jbn\.nnx\.)?[Bb]atch ?[Nn]orm"
    ):
        tool(model)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
