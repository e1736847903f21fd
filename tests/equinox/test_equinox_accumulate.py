"""jbn.equinox.use_accumulation and commit_batch_stats: accumulate, commit == one training step."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn.equinox


def vmapped(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))


@pytest.mark.parametrize("momentum", [0.9, None], ids=["debiased", "cumulative"])
def test_commit_is_one_training_step_float64(momentum):
    """Micro-batches of 2, 5 and 3 examples of shape (3, 4), masked, in a jitted lax.scan
    (padded to 5 with masked-out examples): the commit is one step, to 1e-12."""
    with jax.enable_x64(True):
        make = eqx.nn.make_with_state(jbn.equinox.BatchNorm)
        bn, state = make(3, "batch", momentum=momentum, unbiased_running_var=True)
        rng = np.random.default_rng(0)
        x = rng.normal(2.0, 3.0, (10, 3, 4))
        mask = rng.uniform(size=x.shape) > 0.3
        run = vmapped(lambda x, s, m: bn(x, s, mask=m))
        _, state = jax.jit(run)(x[:4], state, mask[:4])  # some history first
        _, full = jax.jit(run)(x, state, mask)  # one training step on the whole batch

        model, acc_state = jbn.equinox.use_accumulation(bn, state)
        assert model.accumulation == jbn.Accumulate() and bn.accumulation is None
        sizes = (2, 5, 3)
        xs = np.zeros((3, 5, 3, 4))
        ms = np.zeros((3, 5, 3, 4), bool)
        for i, (part, m) in enumerate(zip(np.split(x, [2, 7]), np.split(mask, [2, 7]),
                                          strict=True)):  # fmt: skip
            xs[i, : sizes[i]], ms[i, : sizes[i]] = part, m
        micro = vmapped(lambda x, s, m: model(x, s, mask=m))

        @jax.jit
        def accumulate(s, xs, ms):
            def body(s, batch):
                return micro(*batch[:1], s, batch[1])[1], None

            s, _ = jax.lax.scan(body, s, (xs, ms))
            return jbn.equinox.commit_batch_stats(model, s)

        committed = accumulate(acc_state, xs, ms).get(model.state_index)
        want = full.get(bn.state_index)
        for k in ("mean", "var"):
            np.testing.assert_allclose(committed[k], want[k], rtol=1e-12, atol=1e-12)
        for k in ("count", "feature_count"):
            np.testing.assert_array_equal(committed[k], want[k])
        for k in ("accum_count", "accum_mean", "accum_m2"):
            np.testing.assert_array_equal(committed[k], 0.0)
        # Out of the mode again: the state's structure is the original's.
        back, back_state = jbn.equinox.use_accumulation(model, acc_state, on=False)
        assert back.accumulation is None
        assert jax.tree.structure(back_state) == jax.tree.structure(state)


def test_inference_empty_commit_and_bad_uses():
    bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
    model, state = jbn.equinox.use_accumulation(bn, state)
    x = jnp.arange(12.0).reshape(4, 3)
    y, out = jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None),
                      axis_name="batch")(x, state)  # fmt: skip
    np.testing.assert_array_equal(out.get(model.state_index)["accum_count"], 0.0)
    committed = jbn.equinox.commit_batch_stats(model, state)
    for a, b in zip(jax.tree.leaves(committed), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing accumulated: nothing changes
    with pytest.raises(ValueError, match="no batch norm of the model is in the accumulation"):
        jbn.equinox.commit_batch_stats(bn, state)
    with pytest.raises(ValueError, match="found no batch norm"):
        jbn.equinox.use_accumulation(eqx.nn.Linear(2, 2, key=jax.random.key(0)), state)
    ghost, gstate = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "b", virtual_batch_size=2)
    with pytest.raises(ValueError, match="virtual_batch_size=2"):
        jbn.equinox.use_accumulation(ghost, gstate)
    with pytest.raises(TypeError, match="on must be a Python bool"):
        jbn.equinox.use_accumulation(bn, state, on=1)  # pyright: ignore[reportArgumentType]
