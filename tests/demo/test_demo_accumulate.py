"""The demo's --accumulate K: micro-batches, one optimizer step, committed batch-norm updates."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import tiny_config, write_dataset
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_demo import data, models, train
from mnist_demo.config import Config, ConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="module")
def tiny_splits(tiny_dir):
    with pytest.warns(UserWarning, match="verification is OFF"):
        return data.get_datasets(tiny_config(tiny_dir), log=lambda s: None)


def _steps(config, splits, accumulate, accumulate_bn, steps=2):
    mesh = train.make_mesh(1)
    state = train.create_train_state(jax.random.key(0), config, models.create_model(config), 10)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = train.make_train_step(mesh, accumulate, accumulate_bn)
    images, labels = splits[0].images, splits[0].labels
    for i in range(steps):
        idx = np.arange(i * config.batch_size, (i + 1) * config.batch_size)
        state, metrics = step(state, images[idx], labels[idx])
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("norm", ["jbn", pytest.param("flax", marks=pytest.mark.slow)])
def test_commit_is_the_whole_batch_step_and_micro_updates_differ(tiny_dir, tiny_splits, norm):
    config = tiny_config(tiny_dir, model="mlp", norm=norm, optimizer="sgd",
                         schedule="constant", learning_rate=0.1)  # fmt: skip
    one, m_one = _steps(config, tiny_splits, 1, "commit", steps=1)
    commit, m_commit = _steps(config, tiny_splits, 4, "commit", steps=1)
    micro, _ = _steps(config, tiny_splits, 4, "micro", steps=1)
    first = sorted(commit.batch_stats)[0]  # the first batch norm sees the same inputs
    assert set(commit.batch_stats[first]) == {"mean", "var"}  # no accumulator is kept
    for k in ("mean", "var"):
        np.testing.assert_allclose(commit.batch_stats[first][k], one.batch_stats[first][k],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        gap = np.abs(micro.batch_stats[first][k] - one.batch_stats[first][k]).max()
        assert gap > 1e-3  # 4 updates with micro-batch statistics are another thing
    assert m_commit["count"] == m_one["count"] == config.batch_size
    # The gradient does not depend on how the running statistics are updated.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 commit.params, micro.params)  # fmt: skip


def test_bad_settings(tiny_dir):
    with pytest.raises(ConfigError, match="--accumulate 5 must divide --batch-size 32"):
        tiny_config(tiny_dir, accumulate=5)
    with pytest.raises(ConfigError, match="--accumulate-bn must be one of commit, micro"):
        tiny_config(tiny_dir, accumulate_bn="never")


@pytest.mark.slow  # two tiny runs and a resume: ~1-2 min on 2 busy cores
def test_train_and_resume(tmp_path, tiny_dir, tiny_splits):
    config = tiny_config(tiny_dir, model="mlp", epochs=2, accumulate=4)
    _, history = train.train_and_evaluate(config, tmp_path / "full", datasets=tiny_splits,
                                          log=lambda s: None)  # fmt: skip
    assert history[-1]["test_accuracy"] > 0.3, history

    class Stop(Exception):
        pass

    def stop_after_epoch_1(line):
        if line.startswith("epoch"):
            raise Stop

    with pytest.raises(Stop):
        train.train_and_evaluate(config, tmp_path / "cut", datasets=tiny_splits,
                                 log=stop_after_epoch_1)  # fmt: skip
    resumed = Config(**{**config.__dict__, "resume": True})
    lines = []
    _, again = train.train_and_evaluate(resumed, tmp_path / "cut", datasets=tiny_splits,
                                        log=lines.append)  # fmt: skip
    assert any("resuming from" in line for line in lines)
    drop = ("epoch_seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in again] == [
        {k: v for k, v in h.items() if k not in drop} for h in history
    ]
