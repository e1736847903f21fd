"""jbn.sync_batch_stats on linen: replicas recalibrated on their own shards merge to the whole data."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_to_float64 as assert_close

import jbn


class MLP(nn.Module):
    unbiased: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: jbn.BatchNorm(  # noqa: E731
            use_running_average=not train, unbiased_running_var=self.unbiased
        )
        x = nn.relu(bn()(nn.Dense(6)(x)))
        return bn()(nn.Dense(4)(x))


@pytest.mark.parametrize("unbiased", [False, True])
def test_linen_recalibrated_replicas_merge_to_the_whole_data(unbiased):
    # Each replica recalibrates on its own shard (exact statistics of its data);
    # merged, they equal recalibrating on all the data. Evaluation mode, so every
    # layer's input is the same function of the data for all replicas.
    model = MLP(unbiased)
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)), train=False)
    apply = lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"])  # noqa: E731
    sizes = (3, 10)  # two replicas: each recalibration compiles the model once
    shards = [2.0 + jax.random.normal(jax.random.key(i), (n, 3)) * (i + 1) for i, n in
              enumerate(sizes)]  # fmt: skip
    replicas = [jbn.recalibrate_batch_stats(apply, variables, [s])["batch_stats"] for s in shards]
    merged = jbn.sync_batch_stats(replicas, list(sizes), unbiased=unbiased)
    whole = jbn.recalibrate_batch_stats(apply, variables, shards)["batch_stats"]
    assert_close(merged, jax.tree.map(np.asarray, whole), rtol=1e-5, atol=1e-5)
