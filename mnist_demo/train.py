"""Training and evaluation, data-parallel over the devices (flax's MNIST example's layout).

:func:`create_train_state`, a jitted :func:`train_step`, :func:`train_epoch`,
:func:`evaluate` and :func:`train_and_evaluate` taking a :class:`Config` and a
working directory.

When several devices are visible (e.g. ``XLA_FLAGS=
--xla_force_host_platform_device_count=2`` on a CPU) each batch is split over a
``jax.sharding.Mesh`` axis named ``'data'``; the step runs under
:func:`jax.shard_map` and the batch-norm layers are built with
``axis_name='data'``, so their batch statistics (and the gradients) are
averaged over all devices and the run matches the one-device run.

Across processes (:mod:`mnist_demo.distributed`) the mesh holds every process's
devices; each process builds its rows of each global batch only, and process 0
alone logs and writes the results and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn

from .checkpoints import CHECKPOINT_NAME, Progress, restore_checkpoint, save_checkpoint
from .config import Config
from .data import Split, batches, epoch_permutation, get_datasets, random_shift
from .distributed import broadcast_bytes, global_batch, is_main_process, local_rows, replicate
from .files import atomic_write, remove_stale_tmp
from .models import AXIS, create_model
from .plots import plot_curves

#: What a training run writes into its directory.
RESULT_FILES = (CHECKPOINT_NAME, "metrics.json", "metrics.csv", "curves.png")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped there."""


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


def _without_accumulators(tree: Any) -> Any:
    """``batch_stats`` without jbn's accumulators (checkpoints keep the running statistics)."""
    if isinstance(tree, dict):
        return {k: _without_accumulators(v) for k, v in tree.items() if not k.startswith("accum_")}
    return tree


def accumulated_train_step(
    state: TrainState, images: jax.Array, labels: jax.Array, *, k: int, commit: bool
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the batch, as ``k`` micro-batches.

    A ``lax.scan`` over the micro-batches averages their gradients. With
    ``commit``, the batch norms run under :func:`jbn.linen.use_accumulation` and
    :func:`jbn.linen.commit_batch_stats` applies one running update per step,
    with the statistics of the whole batch (over all devices); without it, each
    micro-batch updates the running statistics, as a framework without
    accumulation does. Runs under :func:`jax.shard_map` like :func:`train_step`.
    """
    micro_images = images.reshape(k, -1, *images.shape[1:])
    micro_labels = labels.reshape(k, -1)
    commit = commit and bool(jax.tree.leaves(state.batch_stats))  # norm=none has nothing to commit

    def apply(variables, x):
        return state.apply_fn(variables, x, train=True, mutable=["batch_stats"])

    def micro(carry, batch):
        grads, batch_stats, loss_sum, correct = carry
        x, y = batch

        def loss_fn(params):
            with jbn.linen.use_accumulation() if commit else contextlib.nullcontext():
                logits, updates = apply({"params": params, "batch_stats": batch_stats}, x)
            loss = jax.lax.pmean(cross_entropy(logits, y).mean(), AXIS)
            return loss, (logits, updates.get("batch_stats", batch_stats))

        (loss, (logits, batch_stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree.map(jnp.add, grads, g)
        correct = correct + jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) == y), AXIS)
        return (grads, batch_stats, loss_sum + loss, correct), None

    batch_stats = state.batch_stats
    if commit:
        batch_stats = jbn.linen.start_accumulation({"batch_stats": batch_stats})["batch_stats"]
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    carry = (zeros, batch_stats, jnp.zeros(()), jnp.zeros((), jnp.int32))
    (grads, batch_stats, loss_sum, correct), _ = jax.lax.scan(
        micro, carry, (micro_images, micro_labels)
    )
    if commit:
        variables = {"params": state.params, "batch_stats": batch_stats}
        committed = jbn.linen.commit_batch_stats(apply, variables, micro_images[0])
        batch_stats = _without_accumulators(committed["batch_stats"])
    state = state.apply_gradients(
        grads=jax.tree.map(lambda g: g / k, grads), batch_stats=batch_stats
    )
    count = jax.lax.psum(labels.shape[0], AXIS)
    return state, {"loss": loss_sum / k, "correct": correct, "count": count}


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


def make_mesh(devices: int = 0) -> Mesh:
    """A one-axis ``('data',)`` mesh over the first ``devices`` devices (0: all)."""
    visible = jax.devices()
    if devices > len(visible):
        raise ValueError(f"--devices {devices}, but only {len(visible)} devices are visible")
    return Mesh(np.array(visible[: devices or len(visible)]), (AXIS,))


def check_devices(config: Config) -> int:
    """Checks ``config.devices`` and ``config.batch_size`` against the visible devices.

    Returns:
      The number of devices the run shards over.

    Raises:
      ValueError: If more devices are asked for than are visible, or the batch
        size is not divisible by their number.
    """
    n_dev = make_mesh(config.devices).devices.size
    per_device = config.batch_size // n_dev
    if not config.batch_size % n_dev and per_device % config.accumulate:
        raise ValueError(
            f"--batch-size {config.batch_size} over {n_dev} device(s) gives {per_device} "
            f"examples per device, which --accumulate {config.accumulate} does not divide; "
            f"use a --batch-size that is a multiple of {n_dev * config.accumulate}"
        )
    if config.batch_size % n_dev:
        n_proc = jax.process_count()
        if n_proc > 1:  # --devices does not apply across processes
            devices = f"{n_dev} devices in use ({n_proc} processes of {n_dev // n_proc})"
            fewer = "fewer devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        else:
            devices, fewer = f"{n_dev} devices in use", "fewer devices (--devices)"
        raise ValueError(
            f"--batch-size {config.batch_size} is not divisible by the {devices}; "
            f"use a multiple of {n_dev} or {fewer}"
        )
    return n_dev


def make_train_step(
    mesh: Mesh, accumulate: int = 1, accumulate_bn: str = "commit"
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """:func:`train_step` (or, with ``accumulate`` > 1, :func:`accumulated_train_step`),
    data-parallel over ``mesh`` and jitted (donating the state)."""
    fn = train_step
    if accumulate > 1:
        commit = accumulate_bn == "commit"
        fn = functools.partial(accumulated_train_step, k=accumulate, commit=commit)
    step = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))
    return jax.jit(step, donate_argnums=0)


def make_eval_step(mesh: Mesh) -> Callable[..., dict[str, jax.Array]]:
    """:func:`eval_step`, data-parallel over ``mesh`` and jitted."""
    return jax.jit(
        jax.shard_map(
            eval_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P()
        )
    )


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
    mine = local_rows(sharding, batch_size)  # this process's rows of each batch
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, len(split), batch_size):
        lo, hi = min(start + mine.start, len(split)), min(start + mine.stop, len(split))
        images, labels = split.images[lo:hi], split.labels[lo:hi]
        weights = np.ones(len(labels), np.float32)
        pad = (mine.stop - mine.start) - len(labels)
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            weights = np.concatenate([weights, np.zeros(pad, np.float32)])
        out = eval_fn(state, *global_batch(sharding, batch_size, images, labels, weights))
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
    ``config.checkpoint_every`` steps if that is set, after the losses of the
    steps since the last one were found finite.

    Raises:
      NonFiniteLossError: At the first step whose training loss is NaN or
        infinite (found at the next progress update or checkpoint, before it).
    """
    from tqdm.auto import tqdm

    order = epoch_permutation(config.seed, progress.epoch, len(train))
    sharding = NamedSharding(mesh, P(AXIS))
    mine = local_rows(sharding, config.batch_size)  # this process's rows of each batch
    pending: list[dict[str, jax.Array]] = []

    def flush():
        first = progress.step_in_epoch - len(pending) + 1
        for i, m in enumerate(jax.device_get(pending)):
            if not np.isfinite(m["loss"]):
                step = progress.epoch * steps_per_epoch + first + i
                raise NonFiniteLossError(
                    f"training loss is {float(m['loss'])} at step {step} (epoch "
                    f"{progress.epoch + 1}, step {first + i}/{steps_per_epoch}); stopped "
                    "there, the last checkpoint (if any) is from before it; try a lower "
                    "--lr or check the data"
                )
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
        disable=not (config.progress and is_main_process()),
        dynamic_ncols=True,
    )
    with bar:
        for idx in batches(order, config.batch_size, progress.step_in_epoch):
            # The shifts are a function of (seed, epoch, step), like the order.
            rng = np.random.default_rng([config.seed, progress.epoch, progress.step_in_epoch])
            idx = idx[mine]
            images = random_shift(
                train.images[idx],
                config.augment_shift,
                rng,
                rows=mine,
                batch_size=config.batch_size,
            )
            images, labels = global_batch(sharding, config.batch_size, images, train.labels[idx])
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
    atomic_write(workdir / "metrics.json", (json.dumps(history, indent=1) + "\n").encode())
    if history:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        atomic_write(workdir / "metrics.csv", buf.getvalue().encode())


def check_fresh_out(
    workdir: str | os.PathLike[str], names: tuple[str, ...], resumable: bool
) -> None:
    """Refuses to write a run's results over those of an earlier run.

    Args:
      workdir: The output directory.
      names: The files the run writes there.
      resumable: Whether ``--resume`` is a way out (training runs).

    Raises:
      FileExistsError: If ``workdir`` holds any of ``names``; the message says
        what to do (one line).
    """
    workdir = pathlib.Path(workdir)
    found = [n for n in names if (workdir / n).exists()]
    if found:
        ways = "continue it with --resume, " if resumable else ""
        raise FileExistsError(
            f"--out {workdir} already holds an earlier run's results ({', '.join(found)}); "
            f"{ways}choose a fresh --out, or pass --overwrite to replace them"
        )


def _quiet(message: str) -> None:
    """The log of the processes other than process 0."""


def _processes() -> str:
    n = jax.process_count()
    return f", {n} processes" if n > 1 else ""


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike[str] | None = None,
    *,
    datasets: tuple[Split, Split] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains and evaluates a model, checkpointing to and writing results in ``workdir``.

    Args:
      config: The run's configuration; ``config.resume`` continues from the
        checkpoint in ``workdir``, ``config.overwrite`` allows replacing an
        earlier run's results (without either, a ``workdir`` that holds them is
        refused).
      workdir: Output directory (default ``config.out``): checkpoint,
        ``metrics.json``/``.csv``, ``curves.png``.
      datasets: The (train, test) splits, if already loaded.
      log: Called with one line per epoch and other messages (in process 0 only).

    In a run across processes (after :func:`mnist_demo.distributed.initialize`),
    every process calls this with the same arguments; process 0 alone logs and
    writes into ``workdir``, and with ``resume`` every process restores the
    checkpoint process 0 reads.

    Returns:
      The final state and the per-epoch metrics.

    Raises:
      FileExistsError: If ``workdir`` holds an earlier run and neither
        ``resume`` nor ``overwrite`` is set.
      ValueError: If the devices do not fit the batch size, or the checkpoint
        cannot be resumed from (:class:`CheckpointError`).
      NonFiniteLossError: If a training or test loss is NaN or infinite; no
        checkpoint is written after it.
    """
    workdir = pathlib.Path(config.out if workdir is None else workdir)
    main = is_main_process()
    if not main:
        log = _quiet
    if main and not (config.resume or config.overwrite):
        check_fresh_out(workdir, RESULT_FILES, resumable=True)
    n_dev = check_devices(config)
    mesh = make_mesh(config.devices)
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        for tmp in remove_stale_tmp(workdir, list(RESULT_FILES)):
            log(f"removed {tmp}, left over from an interrupted write")
    train, test = datasets if datasets is not None else get_datasets(config, log=log)
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the {len(train)} training images"
        )

    model = create_model(config)
    state = create_train_state(jax.random.key(config.seed), config, model, steps_per_epoch)
    progress = Progress()
    if config.resume:
        restored = restore_checkpoint(workdir, state, config, share=broadcast_bytes)
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
    state = replicate(state, NamedSharding(mesh, P()))
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    step_fn = make_train_step(mesh, config.accumulate, config.accumulate_bn)
    eval_fn = make_eval_step(mesh)

    def checkpoint(state: TrainState, progress: Progress) -> None:
        if main:
            save_checkpoint(workdir, state, progress, config)

    if progress.epoch == 0 and progress.step_in_epoch == 0:
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        log(
            f"{config.model} with norm={config.norm}: {n_params:,} parameters; "
            f"{len(train)} training / {len(test)} test images; {n_dev} device(s) "
            f"({jax.devices()[0].platform}{_processes()}); {steps_per_epoch} steps/epoch "
            f"of {config.batch_size}"
            + (
                f" ({config.accumulate} micro-batches of {config.batch_size // config.accumulate}, "
                f"batch-norm updates: {config.accumulate_bn})"
                if config.accumulate > 1
                else ""
            )
        )

    t_run = time.time()
    while progress.epoch < config.epochs:
        t0 = time.time()
        state = train_epoch(
            state, step_fn, train, config, mesh, progress, steps_per_epoch, checkpoint
        )
        metrics = evaluate(state, eval_fn, test, config.eval_batch_size, mesh)
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"test loss is {metrics['loss']} after step {(progress.epoch + 1) * steps_per_epoch} "
                f"(end of epoch {progress.epoch + 1}); stopped there, the last checkpoint (if any) "
                "is from before it; try a lower --lr or check the data"
            )
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
        if main:
            write_metrics(workdir, progress.history)
        log(
            f"epoch {row['epoch']:3d}/{config.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_accuracy']:6.2f}%  test loss {row['test_loss']:.4f} "
            f"acc {100 * row['test_accuracy']:6.2f}%  lr {row['learning_rate']:.2e}  "
            f"{row['epoch_seconds']:.1f}s"
        )
    if progress.history and main:
        write_metrics(workdir, progress.history)
        plot_curves(
            workdir / "curves.png", progress.history, f"MNIST {config.model}, norm={config.norm}"
        )
    log(f"done in {time.time() - t_run:.1f}s; results in {workdir}")
    return state, progress.history
