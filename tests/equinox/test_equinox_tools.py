"""jbn.equinox's tools: recalibrate_batch_stats, freeze/unfreeze_batch_norms, sync_batch_stats.

The references are NumPy float64 transcriptions (tests/np_reference.py): the
population statistics of every layer's input, over all the batches (or all the
replicas' shards); freezing is checked against the layer's own inference mode
and against optax steps that must leave what is frozen bit-identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")
import jbn.equinox as je  # noqa: E402
from jbn import optimize_only  # noqa: E402
from tests.np_reference import np_stats  # noqa: E402

VMAP = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))
EPS = 1e-5


class MLP(eqx.Module):
    """Linear -> BN -> relu -> Linear -> BN, and a stateful counter that is no batch norm."""

    l1: eqx.nn.Linear
    bn1: je.BatchNorm
    l2: eqx.nn.Linear
    bn2: je.BatchNorm
    calls: eqx.nn.StateIndex

    def __init__(self, key, unbiased=False):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(4, 6, key=k1)
        self.bn1 = je.BatchNorm(6, "batch", unbiased_running_var=unbiased)
        self.l2 = eqx.nn.Linear(6, 5, key=k2)
        self.bn2 = je.BatchNorm(5, "batch", momentum=None, unbiased_running_var=unbiased)
        self.calls = eqx.nn.StateIndex(jnp.zeros((), jnp.int32))

    def __call__(self, x, state, mask=None):
        state = state.set(self.calls, state.get(self.calls) + 1)
        h, state = self.bn1(self.l1(x), state, mask=mask)
        return self.bn2(self.l2(jax.nn.relu(h)), state, mask=mask)


def make(unbiased=False):
    model, state = eqx.nn.make_with_state(MLP)(jax.random.key(0), unbiased)
    # Non-trivial weight and bias of bn1, which layer 2's input depends on.
    return eqx.tree_at(
        lambda m: (m.bn1.weight, m.bn1.bias), model, (jnp.linspace(0.5, 2, 6), jnp.full(6, 0.3))
    ), state


def f64(a):
    return np.asarray(a, np.float64)


def dense(layer, x):
    return f64(x) @ f64(layer.weight).T + f64(layer.bias)


def stats(state, layer):
    return {k: np.asarray(v) for k, v in state.get(layer.state_index).items()}


def assert_stats(actual, mean, var):
    np.testing.assert_allclose(actual["mean"], np.ravel(mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(actual["var"], np.ravel(var), rtol=1e-5, atol=1e-6)


RNG = np.random.default_rng(0)
BATCHES = [(RNG.normal(size=(6, 4)) * (1 + i) + i).astype(np.float32) for i in range(3)]


def masked(model, state, batch):
    """A forward for ``(x, mask)`` batches, the mask per example."""
    x, mask = batch
    run = jax.vmap(lambda x, m, s: model(x, s, mask=m), axis_name="batch",
                   in_axes=(0, 0, None), out_axes=(0, None))  # fmt: skip
    return run(x, mask, state)


@eqx.filter_jit
def apply(model, state, x):
    return jax.vmap(model, **VMAP)(x, state)


@pytest.fixture(scope="module")
def mlp():
    return make()


def test_inference_mode_two_passes_give_the_population_statistics_of_every_layer(mlp):
    model, state = mlp
    before = jax.tree.map(np.asarray, state)
    new = je.recalibrate_batch_stats(eqx.nn.inference_mode(model), state, BATCHES, passes=2)
    h1 = np.concatenate([dense(model.l1, x) for x in BATCHES])
    m1, v1, _ = np_stats(h1)
    r1 = stats(new, model.bn1)
    assert_stats(r1, m1, v1)
    # Layer 2's input at evaluation: layer 1 normalizing with its recalibrated statistics.
    a = (h1 - f64(r1["mean"])) / np.sqrt(f64(r1["var"]) + EPS)
    a = np.maximum(a * f64(model.bn1.weight) + f64(model.bn1.bias), 0)
    m2, v2, _ = np_stats(dense(model.l2, a))
    r2 = stats(new, model.bn2)
    assert_stats(r2, m2, v2)
    for r, features in ((r1, 6), (r2, 5)):  # counts: the number of batches
        assert r["count"] == 3 and r["count"].dtype == np.int32
        np.testing.assert_array_equal(r["feature_count"], np.full(features, 3))
    # The state given is unchanged and still valid; other entries pass through.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    assert new.get(model.calls) == 0


def test_training_mode_with_masks_a_nan_batch_and_unbiased_variance():
    model, state = make(unbiased=True)
    masks = [np.arange(6) % (2 + i) != 0 for i in range(3)]  # unequal counts per batch
    bad = BATCHES[0].copy()
    bad[2, 1] = np.nan  # poisons every channel of this batch: skipped by both layers
    batches = [(x, m) for x, m in zip(BATCHES, masks, strict=True)] + [(bad, np.ones(6, bool))]

    new = je.recalibrate_batch_stats(model, state, batches, forward=masked)
    h1s = [dense(model.l1, x)[m] for x, m in zip(BATCHES, masks, strict=True)]
    h1 = np.concatenate(h1s)
    m1, v1, n1 = np_stats(h1)
    assert_stats(stats(new, model.bn1), m1, v1 * n1 / (n1 - 1))
    # Training mode: layer 2 sees each batch normalized with that batch's statistics.
    h2 = []
    for h in h1s:
        m, v, _ = np_stats(h)
        a = (h - m) / np.sqrt(v + EPS) * f64(model.bn1.weight) + f64(model.bn1.bias)
        h2.append(dense(model.l2, np.maximum(a, 0)))
    m2, v2, n2 = np_stats(np.concatenate(h2))
    r2 = stats(new, model.bn2)
    assert_stats(r2, m2, v2 * n2 / (n2 - 1))
    assert r2["count"] == 4  # the steps: every batch; each channel counted the finite ones
    np.testing.assert_array_equal(r2["feature_count"], np.full(5, 3))


def test_errors_leave_the_state_as_it_was(mlp):
    model, state = mlp
    before = jax.tree.map(np.asarray, state)
    x = BATCHES[0]
    recal = je.recalibrate_batch_stats
    with pytest.raises(ValueError, match="batches yielded no batch"):
        recal(model, state, [])
    with pytest.raises(ValueError, match="on pass 2"):
        recal(model, state, (b for b in [x]), passes=2)
    with pytest.raises(ValueError, match=r"not recalibrated: \['MLP.bn2'\]"):
        recal(model, state, [x], forward=lambda m, s, b: jax.vmap(
            lambda x, s: m.bn1(m.l1(x), s), **VMAP)(b, s))  # fmt: skip
    with pytest.raises(ValueError, match="which forward does not bind"):
        recal(model, state, [x], forward=lambda m, s, b: jax.vmap(
            m, in_axes=(0, None), out_axes=(0, None))(b, s))  # fmt: skip
    with pytest.raises(TypeError, match="must return \\(output, state\\)"):
        recal(model, state, [x], forward=lambda m, s, b: jax.vmap(m, **VMAP)(b, s)[0])
    with pytest.raises(TypeError, match="state must be the model's eqx.nn.State"):
        recal(model, {"mean": 0}, [x])
    with pytest.raises(ValueError, match="passes must be a positive int"):
        recal(model, state, [x], passes=0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    linear = eqx.nn.Linear(4, 6, key=jax.random.key(0))
    with pytest.raises(ValueError, match="holds no jbn.equinox.BatchNorm"):
        recal(linear, state, [x])
    two, two_state = eqx.nn.make_with_state(lambda: [je.BatchNorm(4, "a"), je.BatchNorm(4, "b")])()
    with pytest.raises(ValueError, match="name different batch axes"):
        recal(two, two_state, [x])
    flax_like, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch")
    with pytest.raises(ValueError, match="convert the model first"):
        recal(flax_like, eqx_state, [x])


# Freezing


def train_steps(model, state, mask=None, steps=2):
    """Optax steps on a regression loss, in training mode (batch statistics)."""
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = optax.sgd(0.1) if mask is None else optimize_only(optax.sgd(0.1), lambda _: mask)
    opt_state = tx.init(params)

    @eqx.filter_jit
    def step(model, state, opt_state, x):
        def loss(model, state):
            y, state = jax.vmap(model, **VMAP)(x, state)
            return jnp.mean((y - 1.0) ** 2), state

        (_, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, state)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state

    for i in range(steps):
        model, state, opt_state = step(model, state, opt_state, BATCHES[i])
    return model, state


def test_frozen_layers_keep_their_statistics_and_parameters_while_the_rest_trains(mlp):
    model, state = mlp
    state = je.recalibrate_batch_stats(model, state, BATCHES)  # non-trivial statistics
    frozen = eqx.nn.inference_mode(je.freeze_batch_norms(model, stop_gradient=True), False)
    assert isinstance(frozen.bn1, je.FrozenBatchNorm) and frozen.bn2.inference is False
    # The output is the layer's in inference mode, bit for bit.
    y_frozen, _ = apply(frozen, state, BATCHES[0])
    y_eval, _ = apply(eqx.nn.inference_mode(model), state, BATCHES[0])
    np.testing.assert_array_equal(y_frozen, y_eval)
    before = jax.tree.map(np.asarray, state)
    tuned, new_state = train_steps(frozen, jax.tree.map(jnp.asarray, state))
    for layer in ("bn1", "bn2"):
        for name in ("mean", "var", "count", "feature_count"):
            np.testing.assert_array_equal(
                stats(new_state, getattr(model, layer))[name],
                stats(before, getattr(model, layer))[name],
            )
        for name in ("weight", "bias"):  # stop_gradient: not moved by the optimizer
            np.testing.assert_array_equal(
                getattr(getattr(tuned, layer), name), getattr(getattr(model, layer), name)
            )
    assert not np.array_equal(tuned.l1.weight, model.l1.weight)  # the rest trained
    # Unfrozen: the original layers, fields and all; training updates the state again.
    back = je.unfreeze_batch_norms(frozen)
    # tree_equal compares the leaves and the tree structures, static fields included.
    assert type(back.bn1) is je.BatchNorm and bool(eqx.tree_equal(back, model))
    assert back.bn2.momentum is None and back.bn2.state_index.marker == model.bn2.state_index.marker
    _, trained_state = apply(back, state, BATCHES[0])
    assert stats(trained_state, model.bn2)["count"] == 4


def test_without_stop_gradient_the_frozen_parameters_train_and_the_mask_marks_them(mlp):
    model, state = mlp
    frozen = je.freeze_batch_norms(model)
    mask = je.batch_norm_mask(frozen)
    assert mask.bn1.weight is True and mask.bn2.bias is True and mask.l1.weight is False
    tuned, new_state = train_steps(frozen, state, mask=mask, steps=1)
    assert not np.array_equal(tuned.bn2.bias, model.bn2.bias)  # only the batch norms trained
    np.testing.assert_array_equal(tuned.l2.weight, model.l2.weight)
    assert stats(new_state, model.bn1)["count"] == 0


def test_freeze_errors(mlp):
    model, _ = mlp
    with pytest.raises(TypeError, match="stop_gradient must be a bool"):
        je.freeze_batch_norms(model, stop_gradient=1)
    with pytest.raises(ValueError, match="frozen already"):
        je.freeze_batch_norms(je.freeze_batch_norms(model))
    with pytest.raises(ValueError, match="no jbn.equinox.FrozenBatchNorm to unfreeze"):
        je.unfreeze_batch_norms(model)
    with pytest.raises(TypeError, match="convert it first"):
        je.freeze_batch_norms([eqx.nn.BatchNorm(3, "batch", mode="batch")])


# Merging replicas

SIZES = (3, 9, 2, 12)  # unequal shards


@pytest.fixture(scope="module")
def replicas(mlp):
    """Each replica recalibrated (training mode) on its own shard; the reference on all data."""
    model, state = mlp
    rng = np.random.default_rng(1)
    shards = [
        (rng.normal(size=(n, 4)) * (1 + i) - i).astype(np.float32) for i, n in enumerate(SIZES)
    ]
    # Padded to one shape (one compilation), the padding masked out.
    padded = [(np.resize(s, (12, 4)), np.arange(12) < len(s)) for s in shards]
    states = [je.recalibrate_batch_stats(model, state, [b], forward=masked) for b in padded]
    h1 = np.concatenate([dense(model.l1, s) for s in shards])
    return model, states, np_stats(h1)


def assert_merged(model, merged, reference, replica=None):
    m1, v1, _ = reference
    pick = (lambda a: a) if replica is None else (lambda a: a[replica])
    r1 = jax.tree.map(pick, stats(merged, model.bn1))
    assert_stats(r1, m1, v1)
    assert r1["count"] == len(SIZES)  # the replicas' steps, summed
    np.testing.assert_array_equal(r1["feature_count"], np.full(6, len(SIZES)))


def test_sync_a_list_of_replica_states(replicas):
    model, states, reference = replicas
    merged = je.sync_batch_stats(states, list(SIZES))
    assert_merged(model, merged, reference)
    assert merged.get(model.calls) == 0  # other entries: states[0]'s


def test_sync_a_stacked_ensemble_and_inside_a_named_axis(replicas):
    model, states, reference = replicas
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)  # an eqx.filter_vmap ensemble's
    merged = je.sync_batch_stats(stacked, np.array(SIZES))
    assert stats(merged, model.bn1)["mean"].shape == (4, 6)  # each replica keeps its slice
    for i in range(4):
        assert_merged(model, merged, reference, replica=i)
    merge = jax.vmap(lambda s, n: je.sync_batch_stats(s, n, axis_name="r"), axis_name="r")
    merged = merge(stacked, jnp.array(SIZES, jnp.float32))
    assert_merged(model, merged, reference, replica=2)


def test_sync_errors(replicas):
    model, states, _ = replicas
    with pytest.raises(ValueError, match="no leading replica axis"):
        je.sync_batch_stats(states[0])
    with pytest.raises(TypeError, match="must be an eqx.nn.State"):
        je.sync_batch_stats([{"mean": 0.0, "var": 1.0}])
    with pytest.raises(ValueError, match="holds no jbn.equinox.BatchNorm statistics"):
        je.sync_batch_stats([eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "b", mode="batch")[1]])
    with pytest.raises(ValueError, match="this device's own state"):
        je.sync_batch_stats(states, axis_name="r")
    with pytest.raises(ValueError, match="is not bound here"):
        je.sync_batch_stats(states[0], axis_name="r")
    with pytest.raises(ValueError, match="empty list"):
        je.sync_batch_stats([])
