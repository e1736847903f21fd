"""sync_batch_stats: replicas' separate running statistics merged into those of all their data.

The reference is NumPy float64 on the concatenated data: when each replica's
statistics are exact for its own data, the merged ones must be exact for all of
it (the law of total variance), whatever the replicas' counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_float64 as assert_close
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbn

sync_batch_stats = jbn.sync_batch_stats

SIZES = (3, 10, 1, 12)  # unequal counts, one replica with a single example
FEATURES = {("block", "BatchNorm_0"): (5,), ("BatchNorm_1",): (2, 3)}


def replica_data(sizes=SIZES, offset=0.0, seed=0):
    """Per layer, per replica: float64 data of its own location and scale."""
    rng = np.random.default_rng(seed)
    return {
        path: [
            offset + rng.normal(2.0 * i - 3.0, 0.5 + i, (n, *shape)) for i, n in enumerate(sizes)
        ]
        for path, shape in FEATURES.items()
    }


def nest(flat):
    """{("a", "b"): v} as {"a": {"b": v}}."""
    tree = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def stacked_stats(data, ddof=0, dtype=np.float32):
    """Each replica's exact statistics, stacked on a leading replica axis."""
    return nest(
        {
            path: {
                "mean": np.stack([d.mean(0) for d in reps]).astype(dtype),
                "var": np.stack([d.var(0, ddof=min(ddof, len(d) - 1)) for d in reps]).astype(dtype),
            }
            for path, reps in data.items()
        }
    )


def reference(data, ddof=0):
    """The statistics of all replicas' data together, float64."""
    return nest(
        {
            path: {
                "mean": np.concatenate(reps).mean(0),
                "var": np.concatenate(reps).var(0, ddof=ddof),
            }
            for path, reps in data.items()
        }
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_stacked_matches_the_concatenated_data(unbiased):
    data = replica_data()
    ddof = 1 if unbiased else 0
    merged = sync_batch_stats(stacked_stats(data, ddof), np.array(SIZES), unbiased=unbiased)
    assert_close(merged, reference(data, ddof))
    assert merged["block"]["BatchNorm_0"]["mean"].shape == (5,)
    assert merged["BatchNorm_1"]["var"].dtype == jnp.float32


def test_the_variance_of_the_means_is_not_dropped():
    # Two equal replicas with means -1 and 1 and variance 1: the joint variance is 2,
    # not the average of the variances (flax's ImageNet example: pmean gives 1).
    tree = {"bn": {"mean": np.array([[-1.0], [1.0]], np.float32), "var": np.ones((2, 1))}}
    merged = sync_batch_stats(tree)
    np.testing.assert_allclose(merged["bn"]["mean"], [0.0], atol=1e-7)
    np.testing.assert_allclose(merged["bn"]["var"], [2.0], rtol=1e-7)


def test_a_list_of_trees_equals_the_stacked_tree():
    data = replica_data(seed=1)
    stacked = stacked_stats(data)
    trees = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(SIZES))]
    merged = sync_batch_stats(trees, list(SIZES))
    assert_close(merged, reference(data))


def test_equal_counts_by_default():
    data = replica_data(sizes=(6, 6, 6), seed=2)
    assert_close(sync_batch_stats(stacked_stats(data)), reference(data))


def test_one_replica_is_returned_unchanged():
    data = replica_data(sizes=(7,), seed=3)
    assert_close(sync_batch_stats(stacked_stats(data)), reference(data))


def test_large_offset_stays_exact():
    # 1e4 + N(0, 1): the spread of the means is tiny next to the means themselves.
    data = replica_data(offset=1e4, seed=4)
    with jax.enable_x64():
        merged = sync_batch_stats(stacked_stats(data, dtype=np.float64), np.array(SIZES))
        assert merged["BatchNorm_1"]["mean"].dtype == jnp.float64
        assert_close(merged, reference(data), rtol=1e-12, atol=0)
    # float32 statistics: the means are stored to float32's 1e-3 at 1e4.
    merged = sync_batch_stats(stacked_stats(data), np.array(SIZES))
    assert_close(merged, reference(data), rtol=2e-4, atol=0)


def test_dtypes_are_kept_and_counts_summed():
    data = replica_data(seed=5)
    stats = stacked_stats(data)
    layer = stats["block"]["BatchNorm_0"]
    layer["mean"] = layer["mean"].astype(jnp.bfloat16)
    layer["var"] = layer["var"].astype(jnp.bfloat16)
    layer["count"] = np.array([2, 5, 1, 4], np.int32)  # batches seen, momentum=None
    merged = sync_batch_stats(stats, np.array(SIZES, np.float32))["block"]["BatchNorm_0"]
    assert merged["mean"].dtype == merged["var"].dtype == jnp.bfloat16
    assert merged["count"].dtype == jnp.int32 and int(merged["count"]) == 12
    ref = reference(data)["block"]["BatchNorm_0"]
    np.testing.assert_allclose(np.float64(merged["mean"]), ref["mean"], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.float64(merged["var"]), ref["var"], rtol=2e-2)


def test_jit_with_traced_counts():
    data = replica_data(seed=6)
    merged = jax.jit(sync_batch_stats)(stacked_stats(data), jnp.array(SIZES, jnp.float32))
    assert_close(merged, reference(data))


def per_device(tree):
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(len(SIZES))]


def test_pmap_with_axis_name(four_devices):
    data = replica_data(seed=7)
    stats = stacked_stats(data)
    f = jax.pmap(
        lambda s, n: sync_batch_stats(s, n, axis_name="r", unbiased=False),
        axis_name="r",
        devices=four_devices,
    )
    merged = f(stats, jnp.array(SIZES, jnp.float32))
    for device_stats in per_device(merged):  # every device has the merged statistics
        assert_close(device_stats, reference(data))


def test_pmap_unbiased_with_axis_name(four_devices):
    data = replica_data(seed=8)
    f = jax.pmap(
        lambda s, n: sync_batch_stats(s, n, axis_name="r", unbiased=True),
        axis_name="r",
        devices=four_devices,
    )
    merged = f(stacked_stats(data, ddof=1), jnp.array(SIZES))
    assert_close(per_device(merged)[2], reference(data, ddof=1))


@pytest.mark.parametrize("axes", [("data",), ("a", "b")])
def test_shard_map_returns_the_merged_statistics_replicated(four_devices, axes):
    data = replica_data(seed=9)
    mesh = Mesh(np.array(four_devices).reshape((4,) if len(axes) == 1 else (2, 2)), axes)

    def merge(stats, n):
        # Each device's block of the stacked tree has a replica axis of size 1.
        own = jax.tree.map(lambda a: a[0], stats)
        return sync_batch_stats(own, n[0], axis_name=axes if len(axes) > 1 else axes[0])

    f = jax.shard_map(merge, mesh=mesh, in_specs=P(axes), out_specs=P())  # invariant result
    merged = jax.jit(f)(stacked_stats(data), jnp.array(SIZES, jnp.float32))
    assert_close(merged, reference(data))


def test_vmap_with_axis_name():
    data = replica_data(seed=10)
    f = jax.vmap(lambda s, n: sync_batch_stats(s, n, axis_name="r"), axis_name="r")
    merged = f(stacked_stats(data), jnp.array(SIZES, jnp.float32))
    assert_close(per_device(merged)[0], reference(data))


def _with_an_empty_replica(bad):
    """Replica 2 has count 0 and holds ``bad`` (NaN or inf) in every statistic; the
    reference is the float64 statistics of the other replicas' data."""
    data = replica_data(seed=14)
    stats = stacked_stats(data)
    for layer in (stats["block"]["BatchNorm_0"], stats["BatchNorm_1"]):
        layer["mean"][2] = bad
        layer["var"][2] = bad
    stats["BatchNorm_1"]["count"] = np.array([2, 5, 99, 4], np.int32)  # batches seen
    counts = np.array(SIZES, np.float32)
    counts[2] = 0
    kept = {path: [r for i, r in enumerate(reps) if i != 2] for path, reps in data.items()}
    return stats, counts, reference(kept)


def _check_empty_replica_merge(merged, expected):
    count = merged["BatchNorm_1"].pop("count")
    assert_close(merged, expected)
    assert int(count) == 2 + 5 + 4  # the empty replica's batches are left out too


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_replica_without_values_contributes_nothing(bad):
    stats, counts, expected = _with_an_empty_replica(bad)
    _check_empty_replica_merge(sync_batch_stats(stats, counts), expected)
    _check_empty_replica_merge(sync_batch_stats(per_device(stats), list(counts)), expected)
    f = jax.vmap(lambda s, n: sync_batch_stats(s, n, axis_name="r"), axis_name="r")
    _check_empty_replica_merge(per_device(f(stats, jnp.asarray(counts)))[1], expected)


def test_an_unstacked_tree_is_an_error():
    # Without the check, the 5 features of one replica would be merged as 5 replicas.
    one = {"bn": {"mean": np.arange(5.0), "var": np.ones(5)}}
    with pytest.raises(ValueError, match=r"one tree whose batch norm 'bn' has statistics of "
                       r"shape \(5,\), i.e. no leading replica axis"):  # fmt: skip
        sync_batch_stats(one)
    assert_close(sync_batch_stats([one, one]), jax.tree.map(np.asarray, one))  # a list is fine


def layer(r=2, c=3):
    return {"mean": np.zeros((r, c), np.float32), "var": np.ones((r, c), np.float32)}


@pytest.mark.parametrize(
    "stats, counts, kwargs, error, match",
    [
        ({}, None, {}, ValueError, "holds no batch-norm layer"),
        ({"bn": layer(), "extra": np.ones(3)}, None, {}, ValueError, "'extra' is a ndarray"),
        ({"params": {"kernel": np.ones(3)}}, None, {}, ValueError, "not the whole variables"),
        ({"bn": {**layer(), "ema": np.ones(3)}}, None, {}, ValueError, r"holds \['ema'\]"),
        ({"bn": {"mean": np.zeros((2, 3)), "var": np.ones((2, 4))}}, None, {}, ValueError,
         "mean of shape"),
        ({"a": layer(2), "b": layer(3)}, None, {}, ValueError, "leading .replica. axes differ"),
        ({"bn": layer()}, [1.0, 2.0, 3.0], {}, ValueError, r"counts must have shape \(2,\)"),
        ({"bn": layer()}, [1.0, -2.0], {}, ValueError, "finite and >= 0"),
        ({"bn": layer()}, [0, 0], {}, ValueError, "must not all be 0"),
        ({"bn": layer()}, ["a", "b"], {}, TypeError, "counts must be numbers"),
        ({"bn": layer()}, None, {"unbiased": True}, ValueError, "unbiased=True needs counts"),
        ({"bn": layer()}, None, {"axis_name": "nope"}, ValueError, "is not bound here"),
        ([], None, {}, ValueError, "empty list"),
        ([{"bn": layer()}, {"bn2": layer()}], None, {}, ValueError, "replica 1's tree differs"),
        ([{"bn": layer(1)}, {"bn": layer(2)}], None, {}, ValueError, "replica 1 has a leaf"),
    ],
)  # fmt: skip
def test_errors(stats, counts, kwargs, error, match):
    with pytest.raises(error, match=match):
        sync_batch_stats(stats, counts, **kwargs)


def test_scalar_statistics_have_no_replica_axis():
    with pytest.raises(ValueError, match="leading replica axis"):
        sync_batch_stats({"bn": {"mean": np.float32(0), "var": np.float32(1)}})
