"""jbn.nnx.sync_batch_stats: NNX replicas' running statistics merged into those of all their data.

The reference is NumPy float64 on the concatenated data (as for the core's
jbn.sync_batch_stats, tests/core/test_sync.py): lists of models, stacked
ensembles, inside nnx.vmap with an axis_name, and the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close_to_float64 as assert_close

import jbn

sync_nnx_batch_stats = jbn.nnx.sync_batch_stats

SIZES = (3, 10, 1, 12)  # unequal counts, one replica with a single example


class Net(nnx.Module):
    def __init__(self, rngs, flax_bn=False):
        norm = nnx.BatchNorm if flax_bn else jbn.nnx.BatchNorm
        self.dense = nnx.Linear(3, 5, rngs=rngs)
        self.norms = nnx.List([norm(5, rngs=rngs), norm(5, rngs=rngs)])

    def __call__(self, x):
        return self.norms[1](nnx.relu(self.norms[0](self.dense(x))))


def set_stats(model, stats):
    """Writes per-layer {"mean", "var"} (replica i's) into the model's batch norms."""
    for layer, s in zip(model.norms, stats, strict=True):
        layer.mean[...] = jnp.asarray(s["mean"])
        layer.var[...] = jnp.asarray(s["var"])


def nnx_data(seed):
    rng = np.random.default_rng(seed)
    return [[rng.normal(i - 1.5, 1 + i, (n, 5)) for i, n in enumerate(SIZES)] for _ in range(2)]


def nnx_reference(data):
    return [{"mean": np.concatenate(r).mean(0), "var": np.concatenate(r).var(0)} for r in data]


def model_stats(model):
    return [{"mean": layer.mean[...], "var": layer.var[...]} for layer in model.norms]


@pytest.mark.parametrize("flax_bn", [False, True])
def test_nnx_list_of_models(flax_bn):
    data = nnx_data(11)
    models = [Net(nnx.Rngs(0), flax_bn) for _ in SIZES]
    for i, m in enumerate(models):
        set_stats(m, [{"mean": r[i].mean(0), "var": r[i].var(0)} for r in data])
    sync_nnx_batch_stats(models, list(SIZES))
    for m in models:
        assert_close(model_stats(m), nnx_reference(data))


def test_nnx_recalibrated_replicas_merge_to_the_whole_data():
    sizes = (1, 7)
    shards = [jax.random.normal(jax.random.key(i), (n, 3)) * (i + 1) for i, n in enumerate(sizes)]
    models = [Net(nnx.Rngs(0)) for _ in sizes]
    for m, shard in zip(models, shards, strict=True):
        m.eval()
        jbn.nnx.recalibrate_batch_stats(m, [shard])
    sync_nnx_batch_stats(models, list(sizes))
    whole = Net(nnx.Rngs(0))
    whole.eval()
    jbn.nnx.recalibrate_batch_stats(whole, shards)
    expected = jax.tree.map(np.asarray, model_stats(whole))
    assert_close(model_stats(models[1]), expected, atol=1e-5)


@nnx.split_rngs(splits=len(SIZES))
@nnx.vmap(in_axes=0, out_axes=0)
def ensemble(rngs):
    return Net(rngs)


def test_nnx_stacked_ensemble():
    data = nnx_data(12)
    model = ensemble(nnx.Rngs(0))
    set_stats(model, [{"mean": np.stack([d.mean(0) for d in r]),
                       "var": np.stack([d.var(0) for d in r])} for r in data])  # fmt: skip
    sync_nnx_batch_stats(model, np.array(SIZES))
    assert model.norms[0].mean[...].shape == (len(SIZES), 5)  # each replica keeps its slice
    for i in range(len(SIZES)):
        assert_close(
            [jax.tree.map(lambda a, i=i: a[i], s) for s in model_stats(model)],
            nnx_reference(data),
        )


def test_nnx_inside_vmap_with_axis_name():
    data = nnx_data(13)
    model = ensemble(nnx.Rngs(0))
    set_stats(model, [{"mean": np.stack([d.mean(0) for d in r]),
                       "var": np.stack([d.var(0) for d in r])} for r in data])  # fmt: skip

    @nnx.vmap(in_axes=(0, 0), axis_name="ens")
    def merge(m, n):
        sync_nnx_batch_stats(m, n, axis_name="ens")

    merge(model, jnp.array(SIZES, jnp.float32))
    assert_close([jax.tree.map(lambda a: a[3], s) for s in model_stats(model)], nnx_reference(data))


def test_nnx_errors():
    with pytest.raises(ValueError, match="no leading replica axis"):
        sync_nnx_batch_stats(Net(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="holds no batch norm"):
        sync_nnx_batch_stats([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
    with pytest.raises(TypeError, match="must be an nnx.Module or a list"):
        sync_nnx_batch_stats({"a": 1})
    with pytest.raises(ValueError, match="replica 1's tree differs"):
        sync_nnx_batch_stats([Net(nnx.Rngs(0)), jbn.nnx.BatchNorm(5, rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match="this device's own model"):
        sync_nnx_batch_stats([Net(nnx.Rngs(0))], axis_name="r")
