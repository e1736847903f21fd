"""jbn.recalibrate_batch_stats on flax.linen models: population statistics of the data
in training- and evaluation-mode passes, unbiased and masked, its errors, and a
trained model's accuracy restored on shifted data.

The reference is NumPy float64 (tests/np_reference.py) on the concatenated batches.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import recalibration_batches as _batches
from np_reference import np_stats

import jbn


class MLP(nn.Module):
    norm: type = jbn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        is_jbn = self.norm is jbn.BatchNorm
        x = nn.relu(
            self.norm(use_running_average=not train, name="bn1")(nn.Dense(6, name="dense1")(x))
        )
        kw = dict(momentum=None) if is_jbn else {}  # a cumulative layer
        x = nn.relu(
            self.norm(use_running_average=not train, name="bn2", **kw)(
                nn.Dense(5, name="dense2")(x)
            )
        )
        return nn.Dense(2, name="out")(x)


def _np_layer(v, name, h):
    p = v["params"][name]
    return np.asarray(h, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(
        p["bias"], np.float64
    )


def _np_bn(v, name, h, mean, var):
    p = v["params"][name]
    return (h - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"], np.float64) + np.asarray(
        p["bias"], np.float64
    )


@pytest.fixture(scope="module")
def mlp_variables():
    v = MLP().init(jax.random.key(9), jnp.ones((2, 4)), train=False)
    stats = jax.tree.map(
        lambda a: a + 7 if a.dtype == jnp.float32 else a + 5, v["batch_stats"]
    )  # stale statistics
    return {**v, "batch_stats": stats}


def _train_apply(v, x):
    return MLP().apply(v, x, train=True, mutable=["batch_stats"])


def _eval_apply(v, x):
    return MLP().apply(v, x, train=False, mutable=["batch_stats"])


def test_recalibrate_train_mode_gives_population_statistics(mlp_variables):
    v, batches = mlp_variables, _batches()
    new = jbn.recalibrate_batch_stats(_train_apply, v, batches)
    assert new["params"] is v["params"]
    assert jax.tree.structure(new) == jax.tree.structure(v)
    h1 = [_np_layer(v, "dense1", x) for x in batches]
    m1, v1, _ = np_stats(np.concatenate(h1))
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["mean"], m1.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["var"], v1.ravel(), rtol=1e-5)
    # The second layer sees the first normalized with each batch's own statistics.
    h2 = []
    for h in h1:
        m, var, _ = np_stats(h)
        h2.append(_np_layer(v, "dense2", np.maximum(_np_bn(v, "bn1", h, m, var), 0)))
    m2, v2, _ = np_stats(np.concatenate(h2))
    np.testing.assert_allclose(new["batch_stats"]["bn2"]["mean"], m2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn2"]["var"], v2.ravel(), rtol=1e-5)
    assert (new["batch_stats"]["bn2"]["count"] == 3).all()  # cumulative layer: one per batch


def test_recalibrate_eval_mode_passes_make_deeper_layers_exact(mlp_variables):
    v, batches = mlp_variables, _batches()
    one = jbn.recalibrate_batch_stats(_eval_apply, v, batches)
    two = jbn.recalibrate_batch_stats(_eval_apply, v, batches, passes=2)
    h1 = np.concatenate([_np_layer(v, "dense1", x) for x in batches])
    m1, v1, _ = np_stats(h1)
    for out in (one, two):
        np.testing.assert_allclose(
            out["batch_stats"]["bn1"]["mean"], m1.ravel(), rtol=1e-5, atol=1e-6
        )
    # At evaluation the second layer sees the first normalized with its (recalibrated) running statistics.
    h2 = _np_layer(v, "dense2", np.maximum(_np_bn(v, "bn1", h1, m1, v1), 0))
    m2, v2, _ = np_stats(h2)
    np.testing.assert_allclose(two["batch_stats"]["bn2"]["mean"], m2.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["batch_stats"]["bn2"]["var"], v2.ravel(), rtol=1e-5)
    assert not np.allclose(
        one["batch_stats"]["bn2"]["mean"], m2.ravel(), rtol=1e-3
    )  # one pass is not enough


def test_recalibrate_unbiased_and_masked():
    model = jbn.BatchNorm(use_running_average=False, unbiased_running_var=True)
    batches = [
        (
            jax.random.normal(jax.random.key(i), (3, 5, 2)) * (i + 1) + i,
            jax.random.bernoulli(jax.random.key(10 + i), 0.6, (3, 5, 1)),
        )
        for i in range(3)
    ]
    v = model.init(jax.random.key(0), batches[0][0])
    new = jbn.recalibrate_batch_stats(
        lambda v, b: model.apply(v, b[0], mask=b[1], mutable=["batch_stats"]), v, batches
    )
    x = np.concatenate([np.asarray(b[0]).reshape(-1, 2) for b in batches])
    m = np.concatenate(
        [np.broadcast_to(np.asarray(b[1]), b[0].shape).reshape(-1, 2) for b in batches]
    )
    for c in range(2):
        values = x[m[:, c], c].astype(np.float64)
        np.testing.assert_allclose(new["batch_stats"]["mean"][c], values.mean(), rtol=1e-5)
        np.testing.assert_allclose(new["batch_stats"]["var"][c], values.var(ddof=1), rtol=1e-5)


def test_recalibrate_errors(mlp_variables):
    v, batches = mlp_variables, _batches()
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        jbn.recalibrate_batch_stats(_train_apply, {"params": v["params"]}, batches)
    with pytest.raises(
        ValueError, match=r"not recalibrated: \['bn1', 'bn2'\].*flax.linen.BatchNorm"
    ):
        flax_mlp = MLP(norm=nn.BatchNorm)
        jbn.recalibrate_batch_stats(
            lambda v, x: flax_mlp.apply(v, x, train=True, mutable=["batch_stats"]), v, batches
        )
    with pytest.raises(ValueError, match=r"apply_fn must pass mutable=\['batch_stats'\]"):
        jbn.recalibrate_batch_stats(
            lambda v, x: (MLP().apply(v, x, train=False), {"batch_stats": {}}), v, batches
        )
    with pytest.raises(TypeError, match=r"must return \(output, updates\)"):
        jbn.recalibrate_batch_stats(
            lambda v, x: MLP().apply(v, x, train=True, mutable=["batch_stats"])[0], v, batches
        )
    with pytest.raises(ValueError, match="on pass 2: with passes > 1 give a list"):
        jbn.recalibrate_batch_stats(_train_apply, v, iter(batches), passes=2)
    with pytest.raises(ValueError, match="yielded no batch"):
        jbn.recalibrate_batch_stats(_train_apply, v, [])
    with pytest.raises(ValueError, match="passes must be a positive int"):
        jbn.recalibrate_batch_stats(_train_apply, v, batches, passes=0)
    with pytest.raises(ValueError, match="holds no batch-norm layer"):
        jbn.recalibrate_batch_stats(
            _train_apply, {"params": {}, "batch_stats": {"Dense_0": {}}}, [jnp.ones((2, 4))]
        )


def test_recalibration_on_shifted_data_restores_accuracy():
    """Train on one distribution, then the inputs shift and shrink; recalibrating the running statistics recovers."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(jbn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x)))
            return nn.Dense(2)(x)

    k = jax.random.split(jax.random.key(11), 3)
    centers = 1.5 * jax.random.normal(k[0], (2, 8))
    labels = jax.random.bernoulli(k[1], 0.5, (512,)).astype(jnp.int32)
    x = centers[labels] + jax.random.normal(k[2], (512, 8))
    net = Net()
    variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(12), x[:2])
    tx = optax.adam(1e-2)
    opt = tx.init(variables["params"])

    @jax.jit
    def train_step(variables, opt, x, labels):
        def loss(params):
            logits, upd = net.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        grads, upd = jax.grad(loss, has_aux=True)(variables["params"])
        updates, opt = tx.update(grads, opt)
        return {"params": optax.apply_updates(variables["params"], updates), **upd}, opt

    for i in range(60):
        sl = slice(64 * (i % 8), 64 * (i % 8) + 64)
        variables, opt = train_step(variables, opt, x[sl], labels[sl])
    accuracy = jax.jit(
        lambda v, x: jnp.mean(jnp.argmax(net.apply(v, x, train=False), -1) == labels)
    )
    assert accuracy(variables, x) > 0.9
    shifted = 0.5 * x + (centers[1] - centers[0])[None]  # every example drifts toward class 1
    before = float(accuracy(variables, shifted))
    batches = [shifted[i : i + 100] for i in range(0, 512, 100)]
    recalibrated = jbn.recalibrate_batch_stats(
        lambda v, b: net.apply(v, b, train=True, mutable=["batch_stats"]), variables, batches
    )
    after = float(accuracy(recalibrated, shifted))
    assert after > 0.9 and after > before + 0.2, (before, after)
