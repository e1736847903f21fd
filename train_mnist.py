#!/usr/bin/env python
"""MNIST with batch normalization (jbn), and the batch-norm paper's Fig. 1.

``python train_mnist.py`` trains a small CNN with :class:`jbn.BatchNorm` and
reaches about 99.4 % test accuracy in a few minutes on a laptop CPU. Options
select the model (``--model mlp|cnn``), the normalization (``--norm
jbn|flax|none``, where ``flax`` is :class:`flax.linen.BatchNorm` for a side by
side comparison), the optimizer and its schedule, and more; see ``--help``.

Two more modes show what batch norm does:

* ``--fig1`` reproduces Fig. 1 of Ioffe & Szegedy (2015), section 4.1: a
  784-100-100-100-10 sigmoid network trained for 50 000 steps of 60 examples,
  without and with batch norm before each sigmoid: test accuracy against step
  and the 15th/50th/85th percentiles of the input to one sigmoid of the last
  hidden layer over training.
* ``--lr-sweep`` trains that network with and without batch norm at a range of
  learning rates for a fixed budget of steps and tabulates the test accuracy.

Layout follows flax's MNIST example: :func:`get_datasets`,
:func:`create_train_state`, a jitted :func:`train_step`, :func:`train_epoch`,
:func:`evaluate` and :func:`train_and_evaluate` taking a :class:`Config` and a
working directory.

When several devices are visible (e.g. ``XLA_FLAGS=
--xla_force_host_platform_device_count=2`` on a CPU) each batch is split over a
``jax.sharding.Mesh`` axis named ``'data'``; the step runs under
:func:`jax.shard_map` and the batch-norm layers are built with
``axis_name='data'``, so their batch statistics (and the gradients) are
averaged over all devices and the run matches the one-device run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
import mnist_data

AXIS = "data"
CHECKPOINT_NAME = "checkpoint.msgpack"
CHECKPOINT_VERSION = 1
# Mean and standard deviation of the MNIST training pixels (in [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


# --------------------------------------------------------------------------
# Configuration: everything a run depends on, in one place.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """Hyperparameters and settings of a training run.

    The defaults are the default run (``python train_mnist.py``).

    Attributes:
      model: ``'cnn'`` or ``'mlp'``.
      norm: ``'jbn'`` (jbn.BatchNorm), ``'flax'`` (flax.linen.BatchNorm) or ``'none'``.
      epochs: Number of passes over the training set.
      batch_size: Global batch size (split over the devices).
      eval_batch_size: Batch size for evaluation (rounded up to a multiple of
        the device count).
      optimizer: ``'adam'``, ``'adamw'``, ``'sgd'`` or ``'momentum'`` (SGD with
        Nesterov momentum).
      learning_rate: Peak learning rate.
      schedule: ``'cosine'`` (linear warmup, then cosine decay to zero),
        ``'onecycle'`` or ``'constant'``.
      warmup_epochs: Warmup length for ``'cosine'``, in epochs.
      momentum: Momentum of ``'momentum'`` / beta1 of Adam.
      weight_decay: Decoupled weight decay of ``'adamw'``.
      bn_momentum: Momentum of the batch-norm running averages.
      bn_epsilon: Epsilon of batch norm.
      seed: Seed of the initialization and of the data order.
      augment_shift: Shift each training image by up to this many pixels in
        each direction (random, filled with the background; 0: no augmentation).
      train_limit: Use only the first this many training images (0: all).
      num_devices: Number of devices to shard the batch over (0: all visible).
      checkpoint_every: Also checkpoint every this many steps (0: only at the
        end of each epoch).
      data_dir: Directory searched first for the MNIST files.
      download: Whether to download MNIST when it is not found.
      verify: Whether to check the files' SHA-256 (off only for small synthetic
        test files).
      progress: Whether to show a progress bar.
      log_every: Steps between progress-bar updates.
    """

    model: str = "cnn"
    norm: str = "jbn"
    epochs: int = 5
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    seed: int = 0
    augment_shift: int = 2
    train_limit: int = 0
    num_devices: int = 0
    checkpoint_every: int = 0
    data_dir: str | None = None
    download: bool = True
    verify: bool = True
    progress: bool = True
    log_every: int = 20

    # Fields that may differ between a run and its resumption.
    RESUMABLE_CHANGES = frozenset(
        {
            "eval_batch_size",
            "num_devices",
            "checkpoint_every",
            "data_dir",
            "download",
            "verify",
            "progress",
            "log_every",
        }
    )


def default_config() -> Config:
    """Returns the configuration of the default run."""
    return Config()


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
    """One split of MNIST, preprocessed.

    Attributes:
      images: ``float32[n, 28, 28, 1]``, standardized.
      labels: ``int32[n]``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def preprocess(images: np.ndarray) -> np.ndarray:
    """Maps ``uint8[n, 28, 28]`` images to standardized ``float32[n, 28, 28, 1]``."""
    x = images.astype(np.float32) / 255.0
    return ((x - PIXEL_MEAN) / PIXEL_STD)[..., None]


def get_datasets(config: Config, log: Callable[[str], None] = print) -> tuple[Split, Split]:
    """Loads MNIST (finding or downloading it, see :mod:`mnist_data`).

    Args:
      config: Uses ``data_dir``, ``download``, ``verify`` and ``train_limit``.
      log: Called with messages about downloading.

    Returns:
      The training and test splits.
    """
    ds = mnist_data.load_mnist(
        config.data_dir, download_missing=config.download, verify=config.verify, log=log
    )
    n = config.train_limit or len(ds.train_labels)
    train = Split(preprocess(ds.train_images[:n]), ds.train_labels[:n].astype(np.int32))
    test = Split(preprocess(ds.test_images), ds.test_labels.astype(np.int32))
    return train, test


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training examples in one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shifts each image by a random offset in ``[-max_shift, max_shift]`` pixels per axis.

    Args:
      images: ``[n, h, w, c]``.
      max_shift: Largest shift; 0 returns ``images`` unchanged.
      rng: Source of the offsets.

    Returns:
      The shifted images; pixels shifted in are the background value (the minimum).
    """
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    m = max_shift
    padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=images.min())
    dy, dx = rng.integers(0, 2 * m + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------

NormFactory = Callable[..., nn.Module]


def norm_factory(
    kind: str, *, momentum: float = 0.9, epsilon: float = 1e-5, axis_name: str | None = None
) -> NormFactory | None:
    """Returns a constructor of batch-norm layers, or None for no normalization.

    Args:
      kind: ``'jbn'`` for :class:`jbn.BatchNorm`, ``'flax'`` for
        :class:`flax.linen.BatchNorm`, ``'none'`` for None.
      momentum: Momentum of the running averages.
      epsilon: Added to the variance.
      axis_name: Mapped axis over which the batch statistics are averaged
        (``'data'`` under the data-parallel step).

    Returns:
      A callable taking ``use_running_average`` and returning a layer.
    """
    if kind == "none":
        return None
    if kind == "jbn":
        cls = jbn.BatchNorm
    elif kind == "flax":
        cls = nn.BatchNorm
    else:
        raise ValueError(f"unknown norm {kind!r}; expected 'jbn', 'flax' or 'none'")
    return functools.partial(cls, momentum=momentum, epsilon=epsilon, axis_name=axis_name)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (NHWC), as a reshape and a max.

    Equal to ``nn.max_pool(x, (2, 2), (2, 2))`` for even sizes; its gradient is
    much faster on CPU than XLA's select-and-scatter.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
    """Conv(32)-BN-ReLU-pool, Conv(64)-BN-ReLU-pool, Dense(128)-BN-ReLU, Dense(10).

    Attributes:
      norm: Batch-norm constructor (see :func:`norm_factory`), or None.
      features: Channels of the 3x3 convolutions.
      hidden: Width of the hidden dense layer.
    """

    norm: NormFactory | None = None
    features: Sequence[int] = (32, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_bias = self.norm is None
        for f in self.features:
            x = nn.Conv(f, (3, 3), use_bias=use_bias)(x)
            if self.norm is not None:
                x = self.norm(use_running_average=not train)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, use_bias=use_bias)(x)
        if self.norm is not None:
            x = self.norm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x)


class MLP(nn.Module):
    """Fully connected ReLU network with batch norm before each ReLU.

    Attributes:
      norm: Batch-norm constructor, or None.
      hidden: Widths of the hidden layers.
    """

    norm: NormFactory | None = None
    hidden: Sequence[int] = (512, 256)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.Dense(h, use_bias=self.norm is None)(x)
            if self.norm is not None:
                x = self.norm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x)


class Fig1MLP(nn.Module):
    """The network of the paper's section 4.1: 3 x 100 sigmoid units, softmax.

    Weights start from a small Gaussian (``init_std``); with ``norm`` set, batch
    norm sits between each affine map and its sigmoid.

    Attributes:
      norm: Batch-norm constructor, or None for the baseline.
      hidden: Widths of the hidden layers.
      init_std: Standard deviation of the initial weights.
    """

    norm: NormFactory | None = None
    hidden: Sequence[int] = (100, 100, 100)
    init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Returns the logits and the sigmoid inputs of the last hidden layer."""
        init = nn.initializers.normal(self.init_std)
        x = x.reshape((x.shape[0], -1))
        pre = x
        for h in self.hidden:
            x = nn.Dense(h, kernel_init=init, use_bias=self.norm is None)(x)
            if self.norm is not None:
                x = self.norm(use_running_average=not train)(x)
            pre = x
            x = nn.sigmoid(x)
        return nn.Dense(10, kernel_init=init)(x), pre


def create_model(config: Config, axis_name: str | None = AXIS) -> nn.Module:
    """Builds the model named by ``config.model`` with ``config.norm``."""
    norm = norm_factory(
        config.norm, momentum=config.bn_momentum, epsilon=config.bn_epsilon, axis_name=axis_name
    )
    if config.model == "cnn":
        return CNN(norm=norm)
    if config.model == "mlp":
        return MLP(norm=norm)
    raise ValueError(f"unknown model {config.model!r}; expected 'cnn' or 'mlp'")


# --------------------------------------------------------------------------
# Training state, optimizer, steps.
# --------------------------------------------------------------------------


class TrainState(train_state.TrainState):
    """Flax TrainState plus the batch-norm running statistics."""

    batch_stats: Any = None


def create_learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step."""
    total = max(1, config.epochs * steps_per_epoch)
    lr = config.learning_rate
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, lr)
    if config.schedule == "cosine":
        warmup = min(total - 1, int(round(config.warmup_epochs * steps_per_epoch)))
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def create_optimizer(
    config: Config, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """The optax optimizer named by ``config.optimizer``."""
    if config.optimizer == "adam":
        return optax.adam(learning_rate, b1=config.momentum)
    if config.optimizer == "adamw":
        return optax.adamw(learning_rate, b1=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return optax.sgd(learning_rate)
    if config.optimizer == "momentum":
        return optax.sgd(learning_rate, momentum=config.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def create_train_state(
    rng: jax.Array, config: Config, model: nn.Module, steps_per_epoch: int
) -> TrainState:
    """Initializes the parameters, batch statistics and optimizer state."""
    tx = create_optimizer(config, create_learning_rate_schedule(config, steps_per_epoch))

    @jax.jit  # One compilation instead of op-by-op dispatch of every initializer.
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)
        return variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"])

    params, batch_stats, opt_state = init(rng)
    return TrainState(
        step=0,
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=batch_stats,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(
    state: TrainState, images: jax.Array, labels: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the batch.

    Runs under :func:`jax.shard_map` over the ``'data'`` axis (see
    :func:`make_train_step`): the loss is averaged over all devices (and so the
    gradient), batch norm averages its statistics over them too.

    Returns:
      The new state and ``{'loss', 'correct', 'count'}`` summed over the devices
      (``loss`` is the batch mean).
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = jax.lax.pmean(cross_entropy(logits, labels).mean(), AXIS)
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
    )
    correct = jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) == labels), AXIS)
    count = jax.lax.psum(labels.shape[0], AXIS)
    return state, {"loss": loss, "correct": correct, "count": count}


def eval_step(
    state: TrainState, images: jax.Array, labels: jax.Array, weights: jax.Array
) -> dict[str, jax.Array]:
    """Sums of loss, correct predictions and weights over a (padded) batch.

    Uses the running batch-norm statistics. ``weights`` is 0 for padding.
    """
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    sums = {
        "loss": jnp.sum(cross_entropy(logits, labels) * weights),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
        "count": jnp.sum(weights),
    }
    return jax.lax.psum(sums, AXIS)


def make_mesh(num_devices: int = 0) -> Mesh:
    """A one-axis ``('data',)`` mesh over the first ``num_devices`` devices (0: all)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(
                f"--devices {num_devices}, but only {len(devices)} devices are visible"
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,))


def make_train_step(
    mesh: Mesh,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """:func:`train_step`, data-parallel over ``mesh`` and jitted (donating the state)."""
    step = jax.shard_map(
        train_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P())
    )
    return jax.jit(step, donate_argnums=0)


def make_eval_step(mesh: Mesh) -> Callable[..., dict[str, jax.Array]]:
    """:func:`eval_step`, data-parallel over ``mesh`` and jitted."""
    return jax.jit(
        jax.shard_map(
            eval_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P()
        )
    )


# --------------------------------------------------------------------------
# Checkpoints: one msgpack file, replaced atomically.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    """Where a run is, saved with the state in each checkpoint.

    Attributes:
      epoch: The epoch being trained (0-based).
      step_in_epoch: Steps of that epoch already done.
      sums: Running sums of the epoch's training metrics so far.
      history: One dict of metrics per completed epoch.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    sums: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"loss": 0.0, "correct": 0.0, "count": 0.0}
    )
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _config_dict(config: Config) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items()}


def save_checkpoint(
    workdir: pathlib.Path, state: TrainState, progress: Progress, config: Config
) -> pathlib.Path:
    """Saves the state and progress to ``workdir/checkpoint.msgpack`` atomically."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "state": serialization.to_state_dict(jax.device_get(state)),
        "progress": json.dumps(dataclasses.asdict(progress)),
        "config": json.dumps(_config_dict(config)),
    }
    path = workdir / CHECKPOINT_NAME
    mnist_data.atomic_write(path, serialization.msgpack_serialize(payload))
    return path


def restore_checkpoint(
    workdir: pathlib.Path, state: TrainState, config: Config
) -> tuple[TrainState, Progress] | None:
    """Restores the checkpoint in ``workdir`` into the structure of ``state``.

    Returns:
      The restored state and progress, or None if there is no checkpoint.

    Raises:
      ValueError: If the checkpoint was made with a different configuration.
    """
    path = workdir / CHECKPOINT_NAME
    if not path.exists():
        return None
    payload = serialization.msgpack_restore(path.read_bytes())
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')}")
    saved = json.loads(payload["config"])
    now = _config_dict(config)
    diff = {
        k: (saved.get(k), v)
        for k, v in now.items()
        if k not in Config.RESUMABLE_CHANGES and saved.get(k) != v
    }
    if diff:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path} was written with different settings ({details}); "
            "use the same options to resume, or another --out to start afresh"
        )
    state = serialization.from_state_dict(state, payload["state"])
    progress = Progress(**json.loads(payload["progress"]))
    return state, progress


# --------------------------------------------------------------------------
# Training and evaluation loops.
# --------------------------------------------------------------------------


def _batches(order: np.ndarray, batch_size: int, start: int) -> Iterator[np.ndarray]:
    for i in range(start, len(order) // batch_size):
        yield order[i * batch_size : (i + 1) * batch_size]


def evaluate(
    state: TrainState,
    eval_fn: Callable[..., dict[str, jax.Array]],
    split: Split,
    batch_size: int,
    mesh: Mesh,
) -> dict[str, float]:
    """Mean loss and accuracy over a split, with the running batch statistics."""
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = NamedSharding(mesh, P(AXIS))
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size]
        labels = split.labels[start : start + batch_size]
        weights = np.ones(len(labels), np.float32)
        pad = batch_size - len(labels)
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            weights = np.concatenate([weights, np.zeros(pad, np.float32)])
        out = eval_fn(state, *jax.device_put((images, labels, weights), sharding))
        for k, v in jax.device_get(out).items():
            totals[k] += float(v)
    return {
        "loss": totals["loss"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
    }


def train_epoch(
    state: TrainState,
    step_fn,
    train: Split,
    config: Config,
    mesh: Mesh,
    progress: Progress,
    steps_per_epoch: int,
    checkpoint: Callable[[TrainState, Progress], None] | None = None,
) -> TrainState:
    """Trains one epoch (from ``progress.step_in_epoch`` on), updating ``progress``.

    The data order is :func:`epoch_permutation` of (seed, epoch); the last
    incomplete batch is dropped. ``checkpoint`` is called every
    ``config.checkpoint_every`` steps if that is set.
    """
    from tqdm.auto import tqdm

    order = epoch_permutation(config.seed, progress.epoch, len(train))
    sharding = NamedSharding(mesh, P(AXIS))
    pending: list[dict[str, jax.Array]] = []

    def flush():
        for m in jax.device_get(pending):
            progress.sums["loss"] += float(m["loss"]) * float(m["count"])
            progress.sums["correct"] += float(m["correct"])
            progress.sums["count"] += float(m["count"])
        pending.clear()

    bar = tqdm(
        total=steps_per_epoch,
        initial=progress.step_in_epoch,
        leave=False,
        desc=f"epoch {progress.epoch + 1}/{config.epochs}",
        unit="step",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    with bar:
        for idx in _batches(order, config.batch_size, progress.step_in_epoch):
            # The shifts are a function of (seed, epoch, step), like the order.
            rng = np.random.default_rng([config.seed, progress.epoch, progress.step_in_epoch])
            images = random_shift(train.images[idx], config.augment_shift, rng)
            images, labels = jax.device_put((images, train.labels[idx]), sharding)
            state, metrics = step_fn(state, images, labels)
            pending.append(metrics)
            progress.step_in_epoch += 1
            due = config.checkpoint_every and progress.step_in_epoch % config.checkpoint_every == 0
            if len(pending) >= config.log_every or due or progress.step_in_epoch == steps_per_epoch:
                n_new = len(pending)
                flush()
                s = progress.sums
                bar.set_postfix(
                    loss=f"{s['loss'] / s['count']:.4f}",
                    acc=f"{100 * s['correct'] / s['count']:.2f}%",
                    refresh=False,
                )
                bar.update(n_new)
            if due and checkpoint is not None and progress.step_in_epoch < steps_per_epoch:
                checkpoint(state, progress)
    return state


def write_metrics(workdir: pathlib.Path, history: list[dict[str, float]]) -> None:
    """Writes the per-epoch metrics as ``metrics.json`` and ``metrics.csv``."""
    mnist_data.atomic_write(
        workdir / "metrics.json", (json.dumps(history, indent=1) + "\n").encode()
    )
    if history:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        mnist_data.atomic_write(workdir / "metrics.csv", buf.getvalue().encode())


def plot_curves(path: pathlib.Path, history: list[dict[str, float]], title: str) -> None:
    """Saves a PNG of training and test loss and accuracy against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    resume: bool = False,
    datasets: tuple[Split, Split] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains and evaluates a model, checkpointing to and writing results in ``workdir``.

    Args:
      config: The run's configuration.
      workdir: Output directory: checkpoint, ``metrics.json``/``.csv``, ``curves.png``.
      resume: Continue from the checkpoint in ``workdir`` if there is one.
      datasets: The (train, test) splits, if already loaded.
      log: Called with one line per epoch and other messages.

    Returns:
      The final state and the per-epoch metrics.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.num_devices)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(
            f"batch size {config.batch_size} is not divisible by the {n_dev} devices in use; "
            f"use a multiple of {n_dev} (--batch-size) or fewer devices (--devices)"
        )
    train, test = datasets if datasets is not None else get_datasets(config, log=log)
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the {len(train)} training images"
        )

    model = create_model(config)
    state = create_train_state(jax.random.key(config.seed), config, model, steps_per_epoch)
    progress = Progress()
    if resume:
        restored = restore_checkpoint(workdir, state, config)
        if restored is None:
            log(f"no checkpoint in {workdir}; starting from scratch")
        else:
            state, progress = restored
            if progress.epoch >= config.epochs:
                log(f"{workdir / CHECKPOINT_NAME}: all {config.epochs} epochs already done")
            else:
                log(
                    f"resuming from {workdir / CHECKPOINT_NAME}: epoch {progress.epoch + 1}, "
                    f"step {progress.step_in_epoch}/{steps_per_epoch}"
                )
    state = jax.device_put(state, NamedSharding(mesh, P()))
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    step_fn = make_train_step(mesh)
    eval_fn = make_eval_step(mesh)
    checkpoint = functools.partial(_checkpoint, workdir=workdir, config=config)
    if progress.epoch == 0 and progress.step_in_epoch == 0:
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        log(
            f"{config.model} with norm={config.norm}: {n_params:,} parameters; "
            f"{len(train)} training / {len(test)} test images; {n_dev} device(s) "
            f"({jax.devices()[0].platform}); {steps_per_epoch} steps/epoch of {config.batch_size}"
        )

    t_run = time.time()
    while progress.epoch < config.epochs:
        t0 = time.time()
        state = train_epoch(
            state, step_fn, train, config, mesh, progress, steps_per_epoch, checkpoint
        )
        metrics = evaluate(state, eval_fn, test, config.eval_batch_size, mesh)
        s = progress.sums
        row = {
            "epoch": progress.epoch + 1,
            "step": (progress.epoch + 1) * steps_per_epoch,
            "learning_rate": float(schedule((progress.epoch + 1) * steps_per_epoch - 1)),
            "train_loss": s["loss"] / s["count"],
            "train_accuracy": s["correct"] / s["count"],
            "test_loss": metrics["loss"],
            "test_accuracy": metrics["accuracy"],
            "epoch_seconds": round(time.time() - t0, 2),
        }
        progress.history.append(row)
        progress.epoch += 1
        progress.step_in_epoch = 0
        progress.sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        checkpoint(state, progress)
        write_metrics(workdir, progress.history)
        log(
            f"epoch {row['epoch']:3d}/{config.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_accuracy']:6.2f}%  test loss {row['test_loss']:.4f} "
            f"acc {100 * row['test_accuracy']:6.2f}%  lr {row['learning_rate']:.2e}  "
            f"{row['epoch_seconds']:.1f}s"
        )
    if progress.history:
        write_metrics(workdir, progress.history)
        plot_curves(
            workdir / "curves.png", progress.history, f"MNIST {config.model}, norm={config.norm}"
        )
    log(f"done in {time.time() - t_run:.1f}s; results in {workdir}")
    return state, progress.history


def _checkpoint(
    state: TrainState, progress: Progress, *, workdir: pathlib.Path, config: Config
) -> None:
    save_checkpoint(workdir, state, progress, config)


# --------------------------------------------------------------------------
# Paper figure and learning-rate sweep: many steps per jitted call (lax.scan).
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Fig1Config:
    """Settings of ``--fig1`` (the paper's section 4.1) and ``--lr-sweep``.

    Attributes:
      steps: Training steps (the paper: 50 000).
      batch_size: Examples per step (the paper: 60).
      learning_rate: Learning rate of plain SGD.
      init_std: Standard deviation of the Gaussian initial weights.
      eval_every: Steps between evaluations on the test set (one jitted scan each).
      unit: Index of the last-hidden-layer sigmoid whose input is tracked.
      sweep_lrs: Learning rates of ``--lr-sweep``.
      sweep_steps: Steps per learning rate in ``--lr-sweep``.
    """

    steps: int = 50_000
    batch_size: int = 60
    learning_rate: float = 0.5
    init_std: float = 0.01
    eval_every: int = 500
    unit: int = 0
    sweep_lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    sweep_steps: int = 2000


def _step_indices(seed: int, n: int, batch_size: int, start: int, count: int) -> np.ndarray:
    """Example indices of steps ``start..start+count``: epochs of shuffled data, in order."""
    per_epoch = n // batch_size
    rows = []
    epoch, perm = -1, None
    for step in range(start, start + count):
        e, i = divmod(step, per_epoch)
        if e != epoch:
            epoch, perm = e, epoch_permutation(seed, e, n)
        rows.append(perm[i * batch_size : (i + 1) * batch_size])
    return np.stack(rows)


def _init_fig1(model: nn.Module, tx: optax.GradientTransformation, seed: int):
    """Variables (as a dict) and optimizer state of a :class:`Fig1MLP`, initialized in one jit."""

    @jax.jit
    def init(rng):
        variables = dict(model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False))
        return variables, tx.init(variables["params"])

    return init(jax.random.key(seed))


def make_scan_trainer(model: nn.Module, tx: optax.GradientTransformation):
    """Jitted ``(variables, opt_state, lr, images, labels, idx[k, b]) -> (variables, opt_state)``.

    Runs ``k`` SGD steps in one ``lax.scan``; ``lr`` multiplies the optimizer's
    update (``tx`` built with learning rate 1), so it can be vmapped over.
    """

    def step(carry, idx, lr, images, labels):
        variables, opt_state = carry
        x, y = images[idx], labels[idx]

        def loss_fn(params):
            out, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return cross_entropy(out[0], y).mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
        delta, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], jax.tree.map(lambda d: lr * d, delta))
        return ({**variables, **updates, "params": params}, opt_state), None

    @jax.jit
    def run(variables, opt_state, lr, images, labels, idx):
        body = functools.partial(step, lr=lr, images=images, labels=labels)
        (variables, opt_state), _ = jax.lax.scan(body, (variables, opt_state), idx)
        return variables, opt_state

    return run


def make_fig1_evaluator(model: nn.Module, unit: int):
    """Jitted ``(variables, images, labels) -> (accuracy, percentiles[3])`` of the test set.

    The percentiles (15, 50, 85) are of the input to sigmoid ``unit`` of the
    last hidden layer over the test images, in inference mode.
    """

    @jax.jit
    def run(variables, images, labels):
        logits, pre = model.apply(variables, images, train=False)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return acc, jnp.percentile(pre[:, unit], jnp.array([15.0, 50.0, 85.0]))

    return run


def run_fig1(
    fc: Fig1Config,
    seed: int,
    workdir: pathlib.Path,
    datasets: tuple[Split, Split],
    norm: str = "jbn",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the baseline and the batch-norm network of Fig. 1 and plots them.

    Both networks (:class:`Fig1MLP`, with ``norm`` before each sigmoid or
    without) train with plain SGD at ``fc.learning_rate`` on the same data order
    (epochs of shuffled minibatches of ``fc.batch_size``), from initial weights
    drawn with the same seed. Every ``fc.eval_every`` steps (one jitted
    ``lax.scan`` each) the test accuracy and the 15th/50th/85th percentiles of
    the input to sigmoid ``fc.unit`` of the last hidden layer over the test
    images are recorded, in inference mode (batch norm with its running
    averages, momentum 0.99; at step 0 these are still the initial 0 and 1).

    Args:
      fc: Steps, batch size, learning rate, initialization, evaluation period.
      seed: Seed of the initialization and the data order.
      workdir: Where ``fig1.png`` and ``fig1.json`` go.
      datasets: The (train, test) splits.
      norm: ``'jbn'`` or ``'flax'``: the batch norm of the second network.
      log: Called with a line per network.
      progress: Whether to show progress bars.

    Returns:
      ``{'steps': [...], 'baseline'/'batchnorm': {'accuracy': [...], 'percentiles': [[p15, p50, p85], ...]}}``;
      also written to ``workdir/fig1.json``, the figure to ``workdir/fig1.png``.
    """
    from tqdm.auto import tqdm

    train, test = datasets
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    t_images, t_labels = jnp.asarray(test.images), jnp.asarray(test.labels)
    tx = optax.sgd(1.0)
    results: dict[str, Any] = {
        "steps": list(range(0, fc.steps + 1, fc.eval_every)),
        "learning_rate": fc.learning_rate,
        "batch_size": fc.batch_size,
        "init_std": fc.init_std,
        "unit": fc.unit,
        "seed": seed,
    }
    t_all = time.time()
    for name, kind in (("baseline", "none"), ("batchnorm", norm)):
        model = Fig1MLP(norm=norm_factory(kind, momentum=0.99), init_std=fc.init_std)
        variables, opt_state = _init_fig1(model, tx, seed)
        trainer = make_scan_trainer(model, tx)
        evaluator = make_fig1_evaluator(model, fc.unit)
        accs, pcts = [], []
        t0 = time.time()
        for start in tqdm(
            range(0, fc.steps + 1, fc.eval_every),
            desc=f"fig1 {name}",
            leave=False,
            disable=not progress,
        ):
            if start:
                idx = _step_indices(
                    seed, len(train), fc.batch_size, start - fc.eval_every, fc.eval_every
                )
                variables, opt_state = trainer(
                    variables, opt_state, fc.learning_rate, images, labels, idx
                )
            acc, pct = jax.device_get(evaluator(variables, t_images, t_labels))
            accs.append(float(acc))
            pcts.append([float(p) for p in pct])
        results[name] = {
            "accuracy": accs,
            "percentiles": pcts,
            "seconds": round(time.time() - t0, 1),
        }
        log(
            f"fig1 {name}: test accuracy {100 * accs[-1]:.2f}% after {fc.steps} steps "
            f"({time.time() - t0:.0f}s)"
        )
    results["seconds"] = round(time.time() - t_all, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    mnist_data.atomic_write(workdir / "fig1.json", json.dumps(results, indent=1).encode())
    plot_fig1(workdir / "fig1.png", results)
    log(f"wrote {workdir / 'fig1.png'} and fig1.json")
    return results


def plot_fig1(path: pathlib.Path, results: dict[str, Any]) -> None:
    """Draws the three panels of the paper's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array(results["steps"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(steps, results["baseline"]["accuracy"], "--", label="Without BN")
    ax.plot(steps, results["batchnorm"]["accuracy"], "-", label="With BN")
    ax.set(
        xlabel="training step", ylabel="test accuracy", title="(a) test accuracy", ylim=(0.7, 1.0)
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    for ax, name, title in (
        (axes[1], "baseline", "(b) without BN"),
        (axes[2], "batchnorm", "(c) with BN"),
    ):
        p = np.array(results[name]["percentiles"])
        for j, q in enumerate((15, 50, 85)):
            ax.plot(
                steps,
                p[:, j],
                color="C0" if name == "baseline" else "C1",
                alpha=(0.5 if j != 1 else 1.0),
                label=f"{q}th percentile",
            )
        ax.set(
            xlabel="training step",
            ylabel=f"input to sigmoid {results['unit']} of hidden layer 3",
            title=title,
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    lo = min(np.min(results[n]["percentiles"]) for n in ("baseline", "batchnorm"))
    hi = max(np.max(results[n]["percentiles"]) for n in ("baseline", "batchnorm"))
    pad = 0.05 * (hi - lo)
    for ax in axes[1:]:
        ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle(
        f"MNIST, 3x100 sigmoid MLP, SGD lr {results['learning_rate']}, "
        f"batch {results['batch_size']} (Ioffe & Szegedy 2015, Fig. 1)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_lr_sweep(
    fc: Fig1Config,
    seed: int,
    workdir: pathlib.Path,
    datasets: tuple[Split, Split],
    norm: str = "jbn",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains the Fig. 1 network with and without batch norm at each of ``fc.sweep_lrs``.

    All learning rates train at once (``vmap`` over the learning rate), from the
    same initialization and data order, for ``fc.sweep_steps`` SGD steps of
    ``fc.batch_size``.

    Returns:
      ``{'learning_rates': [...], 'baseline'/'batchnorm': {'accuracy': [...], 'curves': [[...]]}}``;
      also written to ``workdir/lr_sweep.json``, a table to ``lr_sweep.md`` and
      the figure to ``lr_sweep.png``.
    """
    from tqdm.auto import tqdm

    train, test = datasets
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    t_images, t_labels = jnp.asarray(test.images), jnp.asarray(test.labels)
    lrs = jnp.asarray(fc.sweep_lrs, jnp.float32)
    n_lr = len(fc.sweep_lrs)
    tx = optax.sgd(1.0)
    chunk = min(fc.eval_every, fc.sweep_steps)
    checkpoints = list(range(0, fc.sweep_steps + 1, chunk))
    results: dict[str, Any] = {
        "learning_rates": list(fc.sweep_lrs),
        "steps": checkpoints,
        "batch_size": fc.batch_size,
        "seed": seed,
    }
    t_all = time.time()
    for name, kind in (("baseline", "none"), ("batchnorm", norm)):
        model = Fig1MLP(norm=norm_factory(kind, momentum=0.99), init_std=fc.init_std)
        stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n_lr,) + a.shape), t)
        variables, opt_state = stack(_init_fig1(model, tx, seed))
        trainer = make_scan_trainer(model, tx)
        vtrain = jax.jit(jax.vmap(trainer, in_axes=(0, 0, 0, None, None, None)))
        evaluator = make_fig1_evaluator(model, 0)
        veval = jax.jit(jax.vmap(lambda v, ev=evaluator: ev(v, t_images, t_labels)[0]))
        curves = [np.asarray(veval(variables))]
        for start in tqdm(
            checkpoints[1:], desc=f"lr sweep {name}", leave=False, disable=not progress
        ):
            idx = _step_indices(seed, len(train), fc.batch_size, start - chunk, chunk)
            variables, opt_state = vtrain(variables, opt_state, lrs, images, labels, idx)
            curves.append(np.asarray(veval(variables)))
        curves_arr = np.nan_to_num(np.stack(curves, axis=1), nan=0.0)  # [n_lr, n_checkpoints]
        results[name] = {"accuracy": curves_arr[:, -1].tolist(), "curves": curves_arr.tolist()}
    results["seconds"] = round(time.time() - t_all, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    mnist_data.atomic_write(workdir / "lr_sweep.json", json.dumps(results, indent=1).encode())
    table = lr_sweep_table(results)
    mnist_data.atomic_write(workdir / "lr_sweep.md", table.encode())
    plot_lr_sweep(workdir / "lr_sweep.png", results)
    log(table)
    log(
        f"lr sweep: {results['seconds']:.0f}s; wrote {workdir / 'lr_sweep.png'}, lr_sweep.md, lr_sweep.json"
    )
    return results


def lr_sweep_table(results: dict[str, Any]) -> str:
    """A Markdown table of the final test accuracy per learning rate."""
    steps = results["steps"][-1]
    lines = ["| SGD learning rate | test accuracy without BN | with BN |", "|---:|---:|---:|"]
    for i, lr in enumerate(results["learning_rates"]):
        lines.append(
            f"| {lr:g} | {100 * results['baseline']['accuracy'][i]:.2f} % "
            f"| {100 * results['batchnorm']['accuracy'][i]:.2f} % |"
        )
    lines.append(f"\n(after {steps} steps of {results['batch_size']} examples)\n")
    return "\n".join(lines)


def plot_lr_sweep(path: pathlib.Path, results: dict[str, Any]) -> None:
    """Final accuracy against learning rate, and accuracy against step at each rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = results["learning_rates"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.semilogx(lrs, results["baseline"]["accuracy"], "o--", label="Without BN")
    ax.semilogx(lrs, results["batchnorm"]["accuracy"], "s-", label="With BN")
    ax.set(
        xlabel="SGD learning rate",
        ylabel="test accuracy",
        ylim=(0, 1),
        title=f"after {results['steps'][-1]} steps of {results['batch_size']}",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    cmap = plt.get_cmap("viridis")
    for ax, name, title in ((axes[1], "baseline", "without BN"), (axes[2], "batchnorm", "with BN")):
        for i, lr in enumerate(lrs):
            ax.plot(
                results["steps"],
                results[name]["curves"][i],
                color=cmap(i / max(1, len(lrs) - 1)),
                label=f"lr {lr:g}",
            )
        ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1), title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see ``--help``)."""
    d = default_config()
    f = Fig1Config()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Trains a CNN with jbn.BatchNorm by default.",
        formatter_class=_HelpFormatter,
        epilog="MNIST (the four IDX files, .gz or not) is looked for in --data-dir, "
        "$JBN_DATA_DIR, ~/.cache/jbn/mnist and ../shared/data/mnist (beside this "
        "repository), in this order; if none has it, it is downloaded (unless "
        "--no-download) into the first of these, and every file is checked against "
        "the SHA-256 of the official uncompressed file.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fig1",
        action="store_true",
        help="reproduce Fig. 1 of the batch-norm paper (sigmoid MLP, 50k steps of 60, "
        "with and without BN): writes fig1.png and fig1.json to --out",
    )
    mode.add_argument(
        "--lr-sweep",
        action="store_true",
        help="sweep the SGD learning rate of the Fig. 1 network with and without BN "
        "for a fixed budget: writes lr_sweep.png/.md/.json to --out",
    )
    g = p.add_argument_group("model and training")
    g.add_argument("--model", choices=("cnn", "mlp"), default=d.model, help="network to train")
    g.add_argument(
        "--norm",
        choices=("jbn", "flax", "none"),
        default=d.norm,
        help="batch norm implementation: jbn.BatchNorm, flax.linen.BatchNorm, or none",
    )
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch size, split over the devices (must be divisible by their number)",
    )
    g.add_argument(
        "--eval-batch-size", type=int, default=d.eval_batch_size, help="batch size for evaluation"
    )
    g.add_argument(
        "--optimizer",
        choices=("adam", "adamw", "sgd", "momentum"),
        default=d.optimizer,
        help="optax optimizer (momentum = SGD with Nesterov momentum)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak learning rate (default {d.learning_rate} for training, "
        f"{f.learning_rate} for --fig1)",
    )
    g.add_argument(
        "--schedule",
        choices=("cosine", "onecycle", "constant"),
        default=d.schedule,
        help="learning-rate schedule (cosine: linear warmup then cosine decay to 0)",
    )
    g.add_argument(
        "--warmup-epochs", type=float, default=d.warmup_epochs, help="warmup of the cosine schedule"
    )
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum / Adam beta1")
    g.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="weight decay of adamw"
    )
    g.add_argument(
        "--bn-momentum",
        type=float,
        default=d.bn_momentum,
        help="momentum of the batch-norm running averages",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seed of initialization and data order")
    g.add_argument(
        "--augment-shift",
        type=int,
        default=d.augment_shift,
        help="random shifts of up to N pixels of the training images (0: none)",
    )
    g.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="train on only the first N training images (0: all 60000); for quick tries",
    )
    g.add_argument(
        "--devices",
        type=int,
        default=0,
        help="shard each batch over the first N devices (0: all visible devices; "
        "e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2 makes 2 CPU devices)",
    )
    o = p.add_argument_group("data and output")
    o.add_argument(
        "--data-dir", default=None, help="directory with the four MNIST IDX files (.gz or not)"
    )
    o.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download MNIST from the public mirrors if it is not found",
    )
    o.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check, only for small synthetic test files "
        "(a warning is printed; official-size files are always checked)",
    )
    o.add_argument(
        "--out",
        default="runs/mnist",
        help="output directory: checkpoint, metrics.json/.csv, curves.png (and fig1/lr-sweep files)",
    )
    o.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    o.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also checkpoint every N steps (0: only at the end of each epoch)",
    )
    o.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a tqdm progress bar",
    )
    o.add_argument(
        "--log-every", type=int, default=d.log_every, help="steps between progress-bar updates"
    )
    q = p.add_argument_group("--fig1 and --lr-sweep")
    q.add_argument(
        "--init-std",
        type=float,
        default=f.init_std,
        help="standard deviation of the Gaussian initial weights of the Fig. 1 network",
    )
    q.add_argument("--fig1-steps", type=int, default=f.steps, help="training steps of --fig1")
    q.add_argument(
        "--eval-every",
        type=int,
        default=f.eval_every,
        help="steps between test evaluations in --fig1 and --lr-sweep",
    )
    q.add_argument(
        "--sweep-lrs",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        default=f.sweep_lrs,
        help="comma-separated learning rates of --lr-sweep",
    )
    q.add_argument(
        "--sweep-steps",
        type=int,
        default=f.sweep_steps,
        help="steps per learning rate of --lr-sweep",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """Builds the training :class:`Config` from parsed arguments."""
    d = default_config()
    return dataclasses.replace(
        d,
        model=args.model,
        norm=args.norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        optimizer=args.optimizer,
        learning_rate=args.lr if args.lr is not None else d.learning_rate,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        bn_momentum=args.bn_momentum,
        seed=args.seed,
        augment_shift=args.augment_shift,
        train_limit=args.train_limit,
        num_devices=args.devices,
        checkpoint_every=args.checkpoint_every,
        data_dir=args.data_dir,
        download=args.download,
        verify=not args.no_verify,
        progress=args.progress,
        log_every=args.log_every,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python train_mnist.py``."""
    args = parse_args(argv)
    config = config_from_args(args)
    out = pathlib.Path(args.out)
    try:
        datasets = get_datasets(config)
    except mnist_data.MNISTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fig1 or args.lr_sweep:
        fc = dataclasses.replace(
            Fig1Config(),
            steps=args.fig1_steps,
            eval_every=args.eval_every,
            sweep_lrs=args.sweep_lrs,
            sweep_steps=args.sweep_steps,
            init_std=args.init_std,
        )
        if args.lr is not None:
            fc = dataclasses.replace(fc, learning_rate=args.lr)
        norm = args.norm if args.norm != "none" else "jbn"
        if args.fig1:
            run_fig1(fc, args.seed, out, datasets, norm=norm, progress=args.progress)
        else:
            run_lr_sweep(fc, args.seed, out, datasets, norm=norm, progress=args.progress)
        return 0
    try:
        train_and_evaluate(config, out, resume=args.resume, datasets=datasets)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
