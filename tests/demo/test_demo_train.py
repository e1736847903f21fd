"""Tests of the demo's training, checkpoints and the paper's experiments, on tiny data.

The default tests use small IDX files they write themselves. The test marked
``slow`` trains the default CNN on the real MNIST files the repository ships
(``data/mnist``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REAL_MNIST, REPO, tiny_config, write_dataset
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_demo import checkpoints, data, models, paper, train
from mnist_demo.checkpoints import CHECKPOINT_NAME, CheckpointError, Progress
from mnist_demo.config import Config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="module")
def tiny_splits(tiny_dir):
    with pytest.warns(UserWarning, match="verification is OFF"):
        return data.get_datasets(tiny_config(tiny_dir), log=lambda s: None)


def quiet(s: str) -> None:
    pass


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["jbn", "flax", "none"])
def test_smoke_train(tmp_path, tiny_dir, tiny_splits, model, norm):
    config = tiny_config(tiny_dir, model=model, norm=norm, epochs=2)
    state, history = train.train_and_evaluate(config, tmp_path, datasets=tiny_splits, log=quiet)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["test_loss"]) for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.3, history  # chance is 0.1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == history
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,step,")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / CHECKPOINT_NAME).exists()
    if norm != "none":
        # Running statistics were updated in training...
        means = [
            np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(state.batch_stats)
            if "mean" in jax.tree_util.keystr(p)
        ]
        assert means and all(np.abs(m).max() > 0 for m in means)
        # ...and are what evaluation uses: an example's output does not depend on its batch.
        x = jnp.asarray(tiny_splits[1].images[:8])
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        full = state.apply_fn(variables, x, train=False)
        single = state.apply_fn(variables, x[:1], train=False)
        np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-5)


def test_batch_not_divisible_by_devices(tmp_path, tiny_dir, tiny_splits):
    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices")
    config = tiny_config(tiny_dir, model="mlp", batch_size=2 * n + 1)
    with pytest.raises(ValueError, match="not divisible by the .* devices"):
        train.train_and_evaluate(config, tmp_path, datasets=tiny_splits, log=quiet)


def _run_steps(config, splits, devices, steps=3):
    """A few train steps on ``devices`` devices; returns the host state and metrics."""
    mesh = train.make_mesh(devices)
    model = models.create_model(config)
    state = train.create_train_state(jax.random.key(0), config, model, 10)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = train.make_train_step(mesh)
    sharding = NamedSharding(mesh, P(models.AXIS))
    train_split, _ = splits
    metrics = []
    for i in range(steps):
        idx = np.arange(i * config.batch_size, (i + 1) * config.batch_size)
        batch = (train_split.images[idx], train_split.labels[idx])
        state, m = step(state, *jax.device_put(batch, sharding))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def test_data_parallel_matches_one_device(tiny_dir, tiny_splits, norm="jbn"):
    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    config = tiny_config(
        tiny_dir,
        model="mlp",
        norm=norm,
        batch_size=8 * n,
        optimizer="sgd",
        schedule="constant",
        learning_rate=0.1,
    )
    one, m1 = _run_steps(config, tiny_splits, 1)
    many, mn = _run_steps(config, tiny_splits, n)
    for a, b in zip(m1, mn, strict=False):
        assert a["count"] == b["count"] == config.batch_size
        assert a["correct"] == b["correct"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    jax.tree.map(close, one.params, many.params)
    jax.tree.map(close, one.batch_stats, many.batch_stats)
    # The parameters did move (the comparison is not vacuous).
    init = train.create_train_state(jax.random.key(0), config, models.create_model(config), 10)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), init.params, one.params)
    assert max(jax.tree.leaves(moved)) > 1e-3


# --------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_dir):
    """A checkpoint of a fresh MLP state, its template, progress and configuration."""
    workdir = tmp_path_factory.mktemp("ckpt")
    config = tiny_config(tiny_dir, model="mlp", norm="jbn")
    model = models.create_model(config)
    state = train.create_train_state(jax.random.key(1), config, model, 10)
    progress = Progress(
        epoch=1,
        step_in_epoch=3,
        sums={"loss": 1.5, "correct": 7.0, "count": 9.0},
        history=[{"epoch": 1, "test_accuracy": 0.5}],
    )
    checkpoints.save_checkpoint(workdir, state, progress, config)
    template = train.create_train_state(jax.random.key(2), config, model, 10)
    return workdir, state, template, progress, config


def test_checkpoint_roundtrip_and_settings_check(saved_checkpoint, tmp_path):
    workdir, state, template, progress, config = saved_checkpoint
    assert [p.name for p in workdir.iterdir()] == [CHECKPOINT_NAME]  # no temp files
    restored, restored_progress = checkpoints.restore_checkpoint(workdir, template, config)
    assert restored_progress == progress
    jax.tree.map(
        np.testing.assert_array_equal,
        (restored.params, restored.batch_stats, restored.opt_state),
        (state.params, state.batch_stats, state.opt_state),
    )
    # Settings that only change how the run is shown or sharded may differ...
    checkpoints.restore_checkpoint(workdir, template, dataclasses.replace(config, devices=1))
    # ...those that change the result may not.
    other = dataclasses.replace(config, learning_rate=0.5, epochs=2)
    with pytest.raises(ValueError, match="different settings.*epochs.*learning_rate"):
        checkpoints.restore_checkpoint(workdir, template, other)
    assert checkpoints.restore_checkpoint(tmp_path / "none", template, config) is None


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:-1000] + bytes([b[-1000] ^ 0x10]) + b[-999:], id="bit-flip"),
        pytest.param(lambda b: b[:10], id="header-only"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_damaged_checkpoint_refused(saved_checkpoint, tmp_path, damage):
    workdir, _, template, _, config = saved_checkpoint
    good = (workdir / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(damage(good))
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore_checkpoint(tmp_path, template, config)
    msg = str(info.value)
    assert str(tmp_path / CHECKPOINT_NAME) in msg and "start afresh" in msg


def test_checkpoint_of_another_version_refused(saved_checkpoint, tmp_path):
    workdir, _, template, _, config = saved_checkpoint
    good = (workdir / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(good.replace(b" 2 sha256", b" 9 sha256", 1))
    with pytest.raises(CheckpointError, match="version 9.*reads version 2"):
        checkpoints.restore_checkpoint(tmp_path, template, config)


def _rewritten(good: bytes, change) -> bytes:
    """A checkpoint with a valid checksum whose payload ``change(payload)`` altered."""
    payload = checkpoints.read_payload("unused", good)
    change(payload)
    return checkpoints.encode(payload)


def _wider_first_layer(payload):
    kernel = payload["state"]["params"]["Dense_0"]["kernel"]
    payload["state"]["params"]["Dense_0"]["kernel"] = np.zeros((kernel.shape[0], 300), np.float32)


def _no_second_batch_norm(payload):
    del payload["state"]["batch_stats"]["BatchNorm_1"]


@pytest.mark.parametrize(
    "change,mismatch",
    [
        (
            _wider_first_layer,
            "params/Dense_0/kernel has shape (784, 300) in the checkpoint, (784, 512) in the model",
        ),
        (
            _no_second_batch_norm,
            "batch_stats/BatchNorm_1 is in the model but not in the checkpoint",
        ),
    ],
    ids=["wider", "missing-layer"],
)
def test_checkpoint_that_does_not_fit_refused_before_restore(
    saved_checkpoint, tmp_path, monkeypatch, change, mismatch
):
    workdir, _, template, _, config = saved_checkpoint
    good = (workdir / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(_rewritten(good, change))
    monkeypatch.setattr(
        checkpoints.serialization,
        "from_state_dict",
        lambda *a, **k: pytest.fail("restored before checking"),
    )
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore_checkpoint(tmp_path, template, config)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / CHECKPOINT_NAME}: its arrays do not fit the model: ")
    assert mismatch in message and "another --out" in message


def test_checkpoint_without_progress_refused(saved_checkpoint, tmp_path):
    workdir, _, template, _, config = saved_checkpoint
    good = (workdir / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(_rewritten(good, lambda p: p.pop("progress")))
    with pytest.raises(CheckpointError, match="not a checkpoint of this demo .it lacks progress"):
        checkpoints.restore_checkpoint(tmp_path, template, config)
    bad = _rewritten(good, lambda p: p.update(progress='{"epoch": 1, "steps": 2}'))
    (tmp_path / CHECKPOINT_NAME).write_bytes(bad)
    with pytest.raises(CheckpointError, match="its settings or progress are unreadable"):
        checkpoints.restore_checkpoint(tmp_path, template, config)


# --------------------------------------------------------------------------
# Guards of a run: earlier results, leftovers, non-finite losses.
# --------------------------------------------------------------------------


def test_earlier_run_not_overwritten(tmp_path, tiny_dir, tiny_splits):
    config = tiny_config(tiny_dir, model="mlp")
    train.train_and_evaluate(config, tmp_path, datasets=tiny_splits, log=quiet)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = dataclasses.replace(config, norm="none")
    with pytest.raises(FileExistsError, match="already holds.*--resume.*fresh --out.*--overwrite"):
        train.train_and_evaluate(other, tmp_path, datasets=tiny_splits, log=quiet)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # --overwrite replaces them.
    overwrite = dataclasses.replace(other, overwrite=True)
    train.train_and_evaluate(overwrite, tmp_path, datasets=tiny_splits, log=quiet)
    payload = checkpoints.read_payload(tmp_path / CHECKPOINT_NAME)
    assert json.loads(payload["config"])["norm"] == "none"


def test_leftover_tmp_removed_at_start(tmp_path, tiny_dir, tiny_splits):
    stale = tmp_path / f"{CHECKPOINT_NAME}.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 100)
    lines = []
    train.train_and_evaluate(
        tiny_config(tiny_dir, model="mlp"), tmp_path, datasets=tiny_splits, log=lines.append
    )
    assert not stale.exists()
    assert any(str(stale) in line for line in lines)
    assert not list(tmp_path.glob("*.tmp"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_dir, tiny_splits):
    train_split, test_split = tiny_splits
    config = tiny_config(tiny_dir, model="mlp", checkpoint_every=4, log_every=100)
    steps_per_epoch = len(train_split) // config.batch_size
    # One NaN image in the batch of step 7 of the first epoch.
    order = data.epoch_permutation(config.seed, 0, len(train_split))
    images = train_split.images.copy()
    images[order[6 * config.batch_size + 3]] = np.nan
    poisoned = (data.Split(images, train_split.labels), test_split)
    with pytest.raises(train.NonFiniteLossError, match=r"at step 7 \(epoch 1, step 7/16\)"):
        train.train_and_evaluate(config, tmp_path, datasets=poisoned, log=quiet)
    assert steps_per_epoch == 16
    # The checkpoint of step 4 is there, nothing after it.
    payload = checkpoints.read_payload(tmp_path / CHECKPOINT_NAME)
    assert json.loads(payload["progress"])["step_in_epoch"] == 4
    leaves = jax.tree.leaves(payload["state"]["params"])
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
    assert not (tmp_path / "metrics.json").exists()


# --------------------------------------------------------------------------
# Killed and resumed: bit-identical metrics.
# --------------------------------------------------------------------------

EPOCHS = 5


def _cli(tiny_dir, out, *extra):
    return [
        sys.executable,
        str(REPO / "train_mnist.py"),
        "--data-dir",
        str(tiny_dir),
        "--no-download",
        "--no-verify",
        "--model",
        "mlp",
        "--norm",
        "jbn",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "32",
        "--checkpoint-every",
        "5",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _final(out):
    history = json.loads((out / "metrics.json").read_text())
    for h in history:
        h.pop("epoch_seconds")
    return history


@pytest.mark.slow  # ~40-75 s on 2 cores: run with -m slow
def test_kill_and_resume(tmp_path, tiny_dir):
    # One device keeps the subprocesses' start-up and compilation short.
    env = dict(
        os.environ, PYTHONWARNINGS="ignore", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted reference run goes on meanwhile.
    reference = subprocess.Popen(
        _cli(tiny_dir, full), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    proc = subprocess.Popen(
        _cli(tiny_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpt = killed / CHECKPOINT_NAME
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    # It was killed mid-run, after a checkpoint.
    progress = json.loads(checkpoints.read_payload(ckpt)["progress"])
    assert progress["epoch"] < EPOCHS, progress

    resumed = subprocess.run(_cli(tiny_dir, killed, "--resume"), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert "resuming from" in resumed.stdout.decode()
    _, err = reference.communicate()
    assert reference.returncode == 0, err.decode()
    assert len(_final(full)) == EPOCHS
    assert _final(killed) == _final(full)


# --------------------------------------------------------------------------
# Fig. 1 and learning-rate sweep machinery (tiny budgets).
# --------------------------------------------------------------------------


@pytest.mark.slow  # ~40-75 s on 2 cores: run with -m slow
def test_fig1_and_sweep_tiny(tmp_path, tiny_splits):
    config = Config(
        mode="fig1",
        fig1_steps=40,
        eval_every=20,
        fig1_batch_size=16,
        sweep_lrs=(0.1, 1.0),
        sweep_steps=20,
        progress=False,
    )
    results = paper.run_fig1(config, tmp_path, tiny_splits, log=quiet)
    assert results["steps"] == [0, 20, 40]
    for name in ("baseline", "batchnorm"):
        assert len(results[name]["accuracy"]) == 3
        p = np.array(results[name]["percentiles"])
        assert p.shape == (3, 3) and np.all(p[:, 0] <= p[:, 1]) and np.all(p[:, 1] <= p[:, 2])
    assert (tmp_path / "fig1.png").stat().st_size > 1000
    sweep = paper.run_lr_sweep(config, tmp_path, tiny_splits, log=quiet)
    assert len(sweep["baseline"]["accuracy"]) == len(sweep["batchnorm"]["accuracy"]) == 2
    assert "| 0.1 |" in (tmp_path / "lr_sweep.md").read_text()
    assert (tmp_path / "lr_sweep.png").stat().st_size > 1000
    # A second Fig. 1 into the same directory is refused, its results kept.
    before = (tmp_path / "fig1.json").read_bytes()
    with pytest.raises(FileExistsError, match="fig1.json.*fresh --out.*--overwrite"):
        paper.run_fig1(config, tmp_path, tiny_splits, log=quiet)
    assert (tmp_path / "fig1.json").read_bytes() == before


# --------------------------------------------------------------------------
# Slow: the real thing.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_cnn_reaches_99_3_percent(tmp_path):
    config = Config(data_dir=str(REAL_MNIST), download=False, progress=False)
    _, history = train.train_and_evaluate(config, tmp_path)
    assert history[-1]["test_accuracy"] >= 0.993, history


def test_checkpoint_from_before_an_option_existed_resumes_at_its_default(
    saved_checkpoint, tmp_path
):
    """A setting the checkpoint lacks (written before the option existed) counts as its default."""
    workdir, _, template, progress, config = saved_checkpoint
    good = (workdir / CHECKPOINT_NAME).read_bytes()

    def older(payload):
        settings = json.loads(payload["config"])
        del settings["accumulate"], settings["accumulate_bn"]
        payload["config"] = json.dumps(settings)

    (tmp_path / CHECKPOINT_NAME).write_bytes(_rewritten(good, older))
    _, restored_progress = checkpoints.restore_checkpoint(tmp_path, template, config)
    assert restored_progress == progress
    # The run it was written by used the default; another value is a different run.
    with pytest.raises(ValueError, match=r"different settings \(accumulate: 1 -> 4\)"):
        checkpoints.restore_checkpoint(
            tmp_path, template, dataclasses.replace(config, accumulate=4)
        )
