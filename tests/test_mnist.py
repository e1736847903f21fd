"""Tests of the MNIST demo: the IDX loader (mnist_data.py) and train_mnist.py.

The default tests use small IDX files they write themselves. The test marked
``slow`` trains the default CNN on the real MNIST files (``../shared/data/mnist``
or ``$JBN_DATA_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mnist_data  # noqa: E402
import train_mnist  # noqa: E402
from mnist_data import MNISTError, MNISTNotFoundError  # noqa: E402

SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
N_TRAIN, N_TEST = 512, 128


def real_mnist_dir() -> pathlib.Path | None:
    """The directory of the real MNIST files for the tests, if there is one."""
    for d in (os.environ.get("JBN_DATA_DIR"), SHARED_MNIST):
        if d and mnist_data.find_files([pathlib.Path(d)]) is not None:
            return pathlib.Path(d)
    return None


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: a bright 7x7 square whose place depends on the label, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = 2 + 8 * (y // 4), 2 + 8 * (y % 4)
        images[i, r : r + 7, c : c + 7] = 255
    return images, labels


def write_dataset(
    directory: pathlib.Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = True
) -> pathlib.Path:
    """Writes the four IDX files (gzip-compressed or not) of a small fake MNIST."""
    directory.mkdir(parents=True, exist_ok=True)
    train = synthetic_digits(n_train, 0)
    test = synthetic_digits(n_test, 1)
    suffix = ".gz" if gz else ""
    for role, array in (
        ("train_images", train[0]),
        ("train_labels", train[1]),
        ("test_images", test[0]),
        ("test_labels", test[1]),
    ):
        mnist_data.write_idx(directory / (mnist_data.FILES[role].name + suffix), array)
    return directory


def load_unverified(directory: pathlib.Path, **kwargs) -> mnist_data.Dataset:
    with pytest.warns(UserWarning, match="verification is OFF"):
        return mnist_data.load_mnist(directory, download_missing=False, verify=False, **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="module")
def tiny_splits(tiny_dir) -> tuple[train_mnist.Split, train_mnist.Split]:
    config = dataclasses.replace(
        train_mnist.default_config(), data_dir=str(tiny_dir), download=False, verify=False
    )
    with pytest.warns(UserWarning, match="verification is OFF"):
        return train_mnist.get_datasets(config)


@pytest.fixture
def no_mnist_anywhere(tmp_path, monkeypatch):
    """No MNIST in any searched directory, and mirrors that cannot be reached."""
    monkeypatch.delenv("JBN_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist_data, "_REPO_SHARED_DIR", tmp_path / "no_shared")
    # Port 9 (discard) on localhost: connection refused at once, no network used.
    monkeypatch.setattr(mnist_data, "MIRRORS", ("http://127.0.0.1:9/",))
    return tmp_path


# --------------------------------------------------------------------------
# Loader.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    images, labels = synthetic_digits(20, 0)
    write_dataset(tmp_path, 20, 10, gz=gz)
    ds = load_unverified(tmp_path)
    np.testing.assert_array_equal(ds.train_images, images)
    np.testing.assert_array_equal(ds.train_labels, labels)
    assert ds.test_images.shape == (10, 28, 28) and ds.test_labels.shape == (10,)


def test_checksum_checked_by_default(tiny_dir):
    with pytest.raises(MNISTError, match="wrong SHA-256"):
        mnist_data.load_mnist(tiny_dir, download_missing=False)


def test_verify_false_does_not_skip_official_size(tmp_path):
    # A file that claims to be the official test labels (10000 of them) is checked anyway.
    write_dataset(tmp_path, 20, 10_000)
    with pytest.warns(UserWarning), pytest.raises(MNISTError, match="wrong SHA-256"):
        mnist_data.load_mnist(tmp_path, download_missing=False, verify=False)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file(tmp_path, gz):
    write_dataset(tmp_path, 20, 10, gz=gz)
    name = mnist_data.FILES["train_images"].name + (".gz" if gz else "")
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(MNISTError, match="truncated"):
        load_unverified(tmp_path)


def test_truncated_header(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    (tmp_path / mnist_data.FILES["test_labels"].name).write_bytes(b"\x00\x00\x08\x01\x00")
    with pytest.raises(MNISTError, match="truncated"):
        load_unverified(tmp_path)


def test_trailing_bytes(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    path = tmp_path / mnist_data.FILES["test_labels"].name
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(MNISTError, match="trailing bytes"):
        load_unverified(tmp_path)


def test_wrong_magic(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    # Labels where images belong: magic 2049 instead of 2051.
    images = tmp_path / mnist_data.FILES["train_images"].name
    mnist_data.write_idx(images, np.zeros(20, np.uint8))
    with pytest.raises(MNISTError, match="wrong magic number.*2049.*expected 2051"):
        load_unverified(tmp_path)


def test_count_mismatch(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    mnist_data.write_idx(tmp_path / mnist_data.FILES["train_labels"].name, np.zeros(19, np.uint8))
    with pytest.raises(
        MNISTError, match="train images and labels differ in count: 20 images.*19 labels"
    ):
        load_unverified(tmp_path)


def test_search_order(tmp_path, monkeypatch):
    first = write_dataset(tmp_path / "given", 20, 10)
    second = write_dataset(tmp_path / "env", 30, 10)
    monkeypatch.setenv("JBN_DATA_DIR", str(second))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dirs = mnist_data.candidate_dirs(first)
    assert dirs[:3] == [first, second, tmp_path / "cache" / "jbn" / "mnist"]
    assert len(load_unverified(first).train_labels) == 20
    assert len(load_unverified(None).train_labels) == 30  # from $JBN_DATA_DIR


def test_offline_no_data_message(no_mnist_anywhere):
    t0 = time.time()
    with pytest.raises(MNISTNotFoundError) as info:
        mnist_data.load_mnist(None, timeout=5, log=lambda s: None)
    assert time.time() - t0 < 30
    msg = str(info.value)
    for spec in mnist_data.FILES.values():
        assert spec.name + ".gz" in msg
    assert str(no_mnist_anywhere / "cache" / "jbn" / "mnist") in msg
    assert "JBN_DATA_DIR" in msg and "--data-dir" in msg
    assert "download failed" in msg and "127.0.0.1:9" in msg
    # Nothing half-downloaded is left behind.
    cache = no_mnist_anywhere / "cache" / "jbn" / "mnist"
    assert not cache.exists() or not any(cache.iterdir())


def test_no_download_message(no_mnist_anywhere):
    with pytest.raises(MNISTNotFoundError, match="downloading disabled"):
        mnist_data.load_mnist(None, download_missing=False)


def test_cli_offline_error(no_mnist_anywhere, capsys):
    rc = train_mnist.main(
        [
            "--no-download",
            "--data-dir",
            str(no_mnist_anywhere / "empty"),
            "--out",
            str(no_mnist_anywhere / "out"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "MNIST data not found" in err and "t10k-labels-idx1-ubyte.gz" in err


def test_download_rejects_bad_file(tmp_path):
    # A mirror serving a corrupt file: rejected, nothing left in the target directory.
    mirror = tmp_path / "mirror"
    write_dataset(mirror, 20, 10)
    target = tmp_path / "target"
    with pytest.raises(MNISTNotFoundError, match="wrong SHA-256"):
        mnist_data.download(target, mirrors=(mirror.as_uri() + "/",), log=lambda s: None)
    assert not any(target.iterdir())


@pytest.mark.skipif(real_mnist_dir() is None, reason="real MNIST files not available")
def test_download_from_mirror(tmp_path):
    # A file:// mirror with the real files stands in for the network.
    mirror = real_mnist_dir().as_uri() + "/"
    target = tmp_path / "target"
    paths = mnist_data.download(
        target, mirrors=("http://127.0.0.1:9/", mirror), timeout=5, log=lambda s: None
    )
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in paths.values())
    ds = mnist_data.load_mnist(target, download_missing=False)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_labels.shape == (10000,)


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def tiny_config(tiny_dir: pathlib.Path, **kwargs) -> train_mnist.Config:
    base = dict(
        epochs=1,
        batch_size=32,
        eval_batch_size=100,
        data_dir=str(tiny_dir),
        download=False,
        verify=False,
        progress=False,
        learning_rate=3e-3,
    )
    base.update(kwargs)
    return dataclasses.replace(train_mnist.default_config(), **base)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["jbn", "flax", "none"])
def test_smoke_train(tmp_path, tiny_dir, tiny_splits, model, norm):
    config = tiny_config(tiny_dir, model=model, norm=norm, epochs=2)
    state, history = train_mnist.train_and_evaluate(
        config, tmp_path, datasets=tiny_splits, log=lambda s: None
    )
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["test_loss"]) for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.3, history  # chance is 0.1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == history
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,step,")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / train_mnist.CHECKPOINT_NAME).exists()
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
        train_mnist.train_and_evaluate(config, tmp_path, datasets=tiny_splits, log=lambda s: None)


def _run_steps(config, splits, num_devices, steps=3):
    """A few train steps on ``num_devices`` devices; returns the host state and metrics."""
    mesh = train_mnist.make_mesh(num_devices)
    model = train_mnist.create_model(config)
    state = train_mnist.create_train_state(jax.random.key(0), config, model, 10)
    state = jax.device_put(state, train_mnist.NamedSharding(mesh, train_mnist.P()))
    step = train_mnist.make_train_step(mesh)
    sharding = train_mnist.NamedSharding(mesh, train_mnist.P(train_mnist.AXIS))
    train, _ = splits
    metrics = []
    for i in range(steps):
        idx = np.arange(i * config.batch_size, (i + 1) * config.batch_size)
        state, m = step(state, *jax.device_put((train.images[idx], train.labels[idx]), sharding))
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
    init = train_mnist.create_train_state(
        jax.random.key(0), config, train_mnist.create_model(config), 10
    )
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), init.params, one.params)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_checkpoint_roundtrip_and_settings_check(tmp_path, tiny_dir):
    config = tiny_config(tiny_dir, model="mlp", norm="jbn")
    model = train_mnist.create_model(config)
    state = train_mnist.create_train_state(jax.random.key(1), config, model, 10)
    progress = train_mnist.Progress(
        epoch=1,
        step_in_epoch=3,
        sums={"loss": 1.5, "correct": 7.0, "count": 9.0},
        history=[{"epoch": 1, "test_accuracy": 0.5}],
    )
    train_mnist.save_checkpoint(tmp_path, state, progress, config)
    assert [p.name for p in tmp_path.iterdir()] == [train_mnist.CHECKPOINT_NAME]  # no temp files
    template = train_mnist.create_train_state(jax.random.key(2), config, model, 10)
    restored, restored_progress = train_mnist.restore_checkpoint(tmp_path, template, config)
    assert restored_progress == progress
    jax.tree.map(
        np.testing.assert_array_equal,
        (restored.params, restored.batch_stats, restored.opt_state),
        (state.params, state.batch_stats, state.opt_state),
    )
    # Settings that only change how the run is shown or sharded may differ...
    train_mnist.restore_checkpoint(tmp_path, template, dataclasses.replace(config, num_devices=1))
    # ...those that change the result may not.
    other = dataclasses.replace(config, learning_rate=0.5, epochs=2)
    with pytest.raises(ValueError, match="different settings.*epochs.*learning_rate"):
        train_mnist.restore_checkpoint(tmp_path, template, other)
    assert train_mnist.restore_checkpoint(tmp_path / "none", template, config) is None


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
    ckpt = killed / train_mnist.CHECKPOINT_NAME
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    # It was killed mid-run, after a checkpoint.
    payload = train_mnist.serialization.msgpack_restore(ckpt.read_bytes())
    progress = json.loads(payload["progress"])
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


def test_fig1_and_sweep_tiny(tmp_path, tiny_splits):
    fc = train_mnist.Fig1Config(
        steps=40, eval_every=20, batch_size=16, sweep_lrs=(0.1, 1.0), sweep_steps=20
    )
    results = train_mnist.run_fig1(fc, 0, tmp_path, tiny_splits, log=lambda s: None)
    assert results["steps"] == [0, 20, 40]
    for name in ("baseline", "batchnorm"):
        assert len(results[name]["accuracy"]) == 3
        p = np.array(results[name]["percentiles"])
        assert p.shape == (3, 3) and np.all(p[:, 0] <= p[:, 1]) and np.all(p[:, 1] <= p[:, 2])
    assert (tmp_path / "fig1.png").stat().st_size > 1000
    sweep = train_mnist.run_lr_sweep(fc, 0, tmp_path, tiny_splits, log=lambda s: None)
    assert len(sweep["baseline"]["accuracy"]) == len(sweep["batchnorm"]["accuracy"]) == 2
    assert "| 0.1 |" in (tmp_path / "lr_sweep.md").read_text()
    assert (tmp_path / "lr_sweep.png").stat().st_size > 1000


# --------------------------------------------------------------------------
# Slow: the real thing.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_cnn_reaches_99_3_percent(tmp_path):
    data = real_mnist_dir()
    if data is None:
        pytest.skip("real MNIST not found in $JBN_DATA_DIR or ../shared/data/mnist")
    config = dataclasses.replace(
        train_mnist.default_config(), data_dir=str(data), download=False, progress=False
    )
    _, history = train_mnist.train_and_evaluate(config, tmp_path)
    assert history[-1]["test_accuracy"] >= 0.993, history
