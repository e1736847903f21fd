"""The paper's experiments: Fig. 1 of Ioffe & Szegedy (2015) and a learning-rate sweep.

Both train :class:`~mnist_demo.models.Fig1MLP` (784-100-100-100-10 sigmoid
units) with plain SGD, without and with batch norm before each sigmoid, many
steps per jitted call (``lax.scan``).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import Config
from .data import Split, get_datasets, step_indices
from .files import atomic_write
from .models import Fig1MLP, norm_factory
from .plots import plot_fig1, plot_lr_sweep
from .train import check_fresh_out, cross_entropy

FIG1_FILES = ("fig1.json", "fig1.png")
LR_SWEEP_FILES = ("lr_sweep.json", "lr_sweep.md", "lr_sweep.png")


def _bn_kind(config: Config) -> str:
    """The batch norm of the second network: ``--norm``, or jbn for ``--norm none``."""
    return config.norm if config.norm != "none" else "jbn"


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
    config: Config,
    workdir: str | pathlib.Path | None = None,
    datasets: tuple[Split, Split] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains the baseline and the batch-norm network of Fig. 1 and plots them.

    Both networks (:class:`Fig1MLP`, with ``config.norm`` before each sigmoid or
    without) train with plain SGD at ``config.learning_rate`` on the same data order
    (epochs of shuffled minibatches of ``config.fig1_batch_size``), from initial weights
    drawn with the same seed. Every ``config.eval_every`` steps (one jitted
    ``lax.scan`` each) the test accuracy and the 15th/50th/85th percentiles of
    the input to sigmoid ``config.fig1_unit`` of the last hidden layer over the test
    images are recorded, in inference mode (batch norm with its running
    averages, momentum 0.99; at step 0 these are still the initial 0 and 1).

    Args:
      config: ``fig1_steps``, ``fig1_batch_size``, ``learning_rate``, ``init_std``,
        ``eval_every``, ``fig1_unit``, ``seed``, ``norm`` (``'none'`` means jbn),
        ``progress``, ``overwrite``.
      workdir: Where ``fig1.png`` and ``fig1.json`` go (default ``config.out``);
        refused if it holds them already, unless ``config.overwrite``.
      datasets: The (train, test) splits (default: loaded as ``config`` says).
      log: Called with a line per network.

    Returns:
      ``{'steps': [...], 'baseline'/'batchnorm': {'accuracy': [...], 'percentiles': [[p15, p50, p85], ...]}}``;
      also written to ``workdir/fig1.json``, the figure to ``workdir/fig1.png``.
    """
    from tqdm.auto import tqdm

    workdir = pathlib.Path(config.out if workdir is None else workdir)
    if not config.overwrite:
        check_fresh_out(workdir, FIG1_FILES, resumable=False)
    if datasets is None:
        datasets = get_datasets(config, log=log)
    seed, norm, progress = config.seed, _bn_kind(config), config.progress
    train, test = datasets
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    t_images, t_labels = jnp.asarray(test.images), jnp.asarray(test.labels)
    tx = optax.sgd(1.0)
    results: dict[str, Any] = {
        "steps": list(range(0, config.fig1_steps + 1, config.eval_every)),
        "learning_rate": config.learning_rate,
        "batch_size": config.fig1_batch_size,
        "init_std": config.init_std,
        "unit": config.fig1_unit,
        "seed": seed,
    }
    t_all = time.time()
    for name, kind in (("baseline", "none"), ("batchnorm", norm)):
        model = Fig1MLP(norm=norm_factory(kind, momentum=0.99), init_std=config.init_std)
        variables, opt_state = _init_fig1(model, tx, seed)
        trainer = make_scan_trainer(model, tx)
        evaluator = make_fig1_evaluator(model, config.fig1_unit)
        accs, pcts = [], []
        t0 = time.time()
        for start in tqdm(
            range(0, config.fig1_steps + 1, config.eval_every),
            desc=f"fig1 {name}",
            leave=False,
            disable=not progress,
        ):
            if start:
                idx = step_indices(
                    seed,
                    len(train),
                    config.fig1_batch_size,
                    start - config.eval_every,
                    config.eval_every,
                )
                variables, opt_state = trainer(
                    variables, opt_state, config.learning_rate, images, labels, idx
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
            f"fig1 {name}: test accuracy {100 * accs[-1]:.2f}% after {config.fig1_steps} steps "
            f"({time.time() - t0:.0f}s)"
        )
    results["seconds"] = round(time.time() - t_all, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(workdir / "fig1.json", json.dumps(results, indent=1).encode())
    plot_fig1(workdir / "fig1.png", results)
    log(f"wrote {workdir / 'fig1.png'} and fig1.json")
    return results


def run_lr_sweep(
    config: Config,
    workdir: str | pathlib.Path | None = None,
    datasets: tuple[Split, Split] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains the Fig. 1 network with and without batch norm at each of ``config.sweep_lrs``.

    All learning rates train at once (``vmap`` over the learning rate), from the
    same initialization and data order, for ``config.sweep_steps`` SGD steps of
    ``config.fig1_batch_size``. Arguments as :func:`run_fig1`.

    Returns:
      ``{'learning_rates': [...], 'baseline'/'batchnorm': {'accuracy': [...], 'curves': [[...]]}}``;
      also written to ``workdir/lr_sweep.json``, a table to ``lr_sweep.md`` and
      the figure to ``lr_sweep.png``.
    """
    from tqdm.auto import tqdm

    workdir = pathlib.Path(config.out if workdir is None else workdir)
    if not config.overwrite:
        check_fresh_out(workdir, LR_SWEEP_FILES, resumable=False)
    if datasets is None:
        datasets = get_datasets(config, log=log)
    seed, norm, progress = config.seed, _bn_kind(config), config.progress
    train, test = datasets
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    t_images, t_labels = jnp.asarray(test.images), jnp.asarray(test.labels)
    lrs = jnp.asarray(config.sweep_lrs, jnp.float32)
    n_lr = len(config.sweep_lrs)
    tx = optax.sgd(1.0)
    chunk = min(config.eval_every, config.sweep_steps)
    checkpoints = list(range(0, config.sweep_steps + 1, chunk))
    results: dict[str, Any] = {
        "learning_rates": list(config.sweep_lrs),
        "steps": checkpoints,
        "batch_size": config.fig1_batch_size,
        "seed": seed,
    }
    t_all = time.time()
    for name, kind in (("baseline", "none"), ("batchnorm", norm)):
        model = Fig1MLP(norm=norm_factory(kind, momentum=0.99), init_std=config.init_std)
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
            idx = step_indices(seed, len(train), config.fig1_batch_size, start - chunk, chunk)
            variables, opt_state = vtrain(variables, opt_state, lrs, images, labels, idx)
            curves.append(np.asarray(veval(variables)))
        curves_arr = np.nan_to_num(np.stack(curves, axis=1), nan=0.0)  # [n_lr, n_checkpoints]
        results[name] = {"accuracy": curves_arr[:, -1].tolist(), "curves": curves_arr.tolist()}
    results["seconds"] = round(time.time() - t_all, 1)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(workdir / "lr_sweep.json", json.dumps(results, indent=1).encode())
    table = lr_sweep_table(results)
    atomic_write(workdir / "lr_sweep.md", table.encode())
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
