"""jbn.linen.use_accumulation and commit_batch_stats: accumulate, commit == one training step."""

from __future__ import annotations

from contextlib import nullcontext

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn


def apply_fn(model, **kwargs):
    return lambda v, x: model.apply(v, x, mutable=["batch_stats"], **kwargs)


@pytest.mark.parametrize("momentum", [0.8, None])
def test_jbn_batch_norm_masks_unequal_sizes_float64(momentum):
    """Micro-batches of 2, 5 and 3 NHWC examples with masks: the commit is one step, to 1e-12."""
    with jax.enable_x64(True):
        bn = jbn.BatchNorm(momentum=momentum, unbiased_running_var=True,
                           force_float32_reductions=False, param_dtype=jnp.float64)  # fmt: skip
        rng = np.random.default_rng(0)
        x = rng.normal(2.0, 3.0, (10, 2, 2, 3))
        mask = rng.uniform(size=x.shape) > 0.3
        variables = bn.init(jax.random.key(0), x, use_running_average=False)
        step = jax.jit(lambda v, x, m: bn.apply(v, x, use_running_average=False, mask=m,
                                                 mutable=["batch_stats"]))  # fmt: skip
        _, full = step(variables, x, mask)  # one training step on the whole batch
        v = variables
        with jbn.linen.use_accumulation():
            accumulate = jax.jit(step)  # traced anew inside the context
            for part, m in zip(np.split(x, [2, 7]), np.split(mask, [2, 7]), strict=True):
                y, updates = accumulate(v, part, m)
                want, _ = step(variables, part, m)
                np.testing.assert_array_equal(y, want)  # normalized as in training
                v = {**v, **updates}
        for k in full["batch_stats"]:  # nothing updated yet
            np.testing.assert_array_equal(v["batch_stats"][k], variables["batch_stats"][k])

        def apply(v, x):
            return bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])

        committed = jbn.linen.commit_batch_stats(apply, v, x[:2])
        for k, want in full["batch_stats"].items():
            np.testing.assert_allclose(committed["batch_stats"][k], want, rtol=1e-12, atol=1e-12)
        for k in ("accum_count", "accum_mean", "accum_m2"):
            np.testing.assert_array_equal(committed["batch_stats"][k], 0.0)


class Net(nn.Module):
    """Two batch norms on branches of the input, so each sees the same values either way
    (a batch norm after another sees activations normalized per micro-batch)."""

    @nn.compact
    def __call__(self, x, train: bool):
        a = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(4, (3, 3))(x))
        b = nn.BatchNorm(use_running_average=not train, momentum=0.7)(nn.Dense(2)(x.mean((1, 2))))
        return nn.Dense(2)(nn.relu(a).mean(axis=(1, 2))) + b


@pytest.mark.parametrize("adopted", [True, False], ids=["intercept", "flax"])
def test_flax_batch_norms_in_a_jitted_scan(adopted):
    """flax BatchNorms (under intercept(), whose options apply, or directly): a jitted
    lax.scan over 4 micro-batches that sums gradients, then one commit."""
    model = Net()
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 2)) * 2 + 1
    variables = model.init(jax.random.key(1), x, train=False)
    train = apply_fn(model, train=True)
    context = jbn.linen.intercept(unbiased_running_var=True) if adopted else nullcontext()

    def loss(params, v, xm):
        y, updates = train({**v, "params": params}, xm)
        return jnp.sum(y**2), updates["batch_stats"]

    @jax.jit
    def accumulated(v, x):
        def body(carry, xm):
            grads, bs = carry
            with jbn.linen.use_accumulation():
                g, bs = jax.grad(loss, has_aux=True)(v["params"], {**v, "batch_stats": bs}, xm)
            return (jax.tree.map(jnp.add, grads, g), bs), None

        v = jbn.linen.start_accumulation(v)
        zeros = jax.tree.map(jnp.zeros_like, v["params"])
        (grads, bs), _ = jax.lax.scan(
            body, (zeros, v["batch_stats"]), x.reshape(4, 2, *x.shape[1:])
        )
        return grads, jbn.linen.commit_batch_stats(train, {**v, "batch_stats": bs}, x[:2])

    with context:  # one training step: jbn's with intercept's options, or flax's own
        grads, committed = accumulated(variables, x)
        _, full = jax.jit(train)(variables, x)
    tol = 1e-5 if adopted else 2e-5  # flax's fast variance differs in the last bits
    for path, want in jax.tree_util.tree_leaves_with_path(full["batch_stats"]):
        got = committed["batch_stats"]
        for key in path:
            got = got[key.key]
        np.testing.assert_allclose(got, want, rtol=tol, atol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_evaluation_calls_run_as_usual_and_bad_uses():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
    variables = model.init(jax.random.key(1), x, train=False)
    with jbn.linen.use_accumulation():
        y = model.apply(variables, x, train=False)  # evaluation: no accumulator, no mutable
    np.testing.assert_array_equal(y, model.apply(variables, x, train=False))
    with (
        pytest.raises(ValueError, match=r"pass mutable=\['batch_stats'\]"),
        jbn.linen.use_accumulation(),
    ):
        model.apply(variables, x, train=True)
    train = apply_fn(model, train=True)
    with pytest.raises(ValueError, match="has no accumulator: run the micro-batches under"):
        jbn.linen.commit_batch_stats(train, variables, x)
    with pytest.raises(ValueError, match=r"needs apply_fn to return \(output, updates\)"):
        jbn.linen.commit_batch_stats(
            lambda v, x: model.apply(v, x, train=False), jbn.linen.start_accumulation(variables), x
        )
    with pytest.raises(ValueError, match="batch_stats collection"):
        jbn.linen.commit_batch_stats(train, {"params": variables["params"]}, x)
    with pytest.raises(ValueError, match="batch_stats collection"):
        jbn.linen.start_accumulation({"params": variables["params"]})
    bn = jbn.BatchNorm(use_running_average=False, virtual_batch_size=2)
    v = bn.init(jax.random.key(0), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="virtual_batch_size=2, renorm=False"):
        with jbn.linen.use_accumulation():
            bn.apply(v, jnp.ones((4, 3)), mutable=["batch_stats"])
