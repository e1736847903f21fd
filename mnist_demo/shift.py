"""Batch norm under a domain shift: stale statistics, recalibration, fine-tuning the batch norms.

A model trained on clean MNIST keeps the running statistics of clean MNIST.
On shifted test images (contrast and brightness changed, Gaussian noise, both,
inverted) :func:`run_domain_shift` measures per domain:

- ``stale``: the model as trained;
- ``recalibrated``: after :func:`jbn.recalibrate_batch_stats` on unlabeled
  images of the new domain (AdaBN, Li et al. 2016), from 1, 10 or all batches;
- ``bn_finetuned``: after fine-tuning only the batch-norm scales and biases
  (everything else frozen) on a few hundred labeled images of the new domain;
- ``batch_stats``: normalizing with each test batch's own statistics, at batch
  sizes 8 and 128. (At batch size 1 every feature of a batch-norm layer after a
  dense layer has variance 0 over the batch, so its output is its bias whatever
  the image: the prediction is the same for every input.)
- ``prior`` and ``prior_linear``: test-time adaptation with prior-weighted
  statistics (:func:`jbn.linen.use_prior`; Schneider et al. 2020), each test
  batch of 1, 8 or 128 images normalized with the running statistics, counted
  as N images, pooled exactly with the batch's own (``prior``), or mixed
  linearly as in the paper (``prior_linear``), for N in 0, 1, 4, ..., 256;
- ``tent`` and ``tent_prior``: TENT (:class:`jbn.linen.Tent`; Wang et al. 2021),
  entropy minimization on the batch-norm scales and biases over the adaptation
  images (one pass, batches of 128, Adam 1e-3), then scored in batches of 128,
  with batch statistics or with the prior N that scored best at batch 128.

Then every domain's scoring half is streamed in test-set order and sorted by
label, at batch sizes 1, 8 and 64 (:mod:`mnist_demo.streams`: stale, batch
statistics, the best prior, the stream mode and TENT with it), and all domains
in one stream: ``continual`` (clean, the shifted domains, clean again, never
reset) and ``mixed`` (all shuffled together), written to
``domain_shift_streams.json``, ``.md`` and ``.png``.

Each domain's test set is split in two: the first half provides the images
that the methods adapt on, the second half is where every method is scored.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbn

from .config import Config
from .data import PIXEL_MEAN, PIXEL_STD, Split, get_datasets
from .files import atomic_write
from .models import create_model
from .plots import plot_domain_shift, plot_streams
from .streams import stream_records, stream_table
from .train import check_fresh_out, cross_entropy, train_and_evaluate

DOMAIN_SHIFT_FILES = (
    "domain_shift.json",
    "domain_shift.md",
    "domain_shift.png",
    "domain_shift_streams.json",
    "domain_shift_streams.md",
    "domain_shift_streams.png",
)
RECALIBRATION_BATCH = 128
BATCH_STATS_SIZES = (8, 128)
PRIOR_SIZES = (1, 8, 128)
PRIORS = (0, 1, 4, 16, 64, 256)
PRIOR_METHODS = {"prior": "pooled", "prior_linear": "linear"}
TENT_BATCH = 128
# Images per compiled call when scoring with prior-weighted statistics.
PRIOR_CHUNK = 1024


def _pixels(split: Split) -> np.ndarray:
    """Standardized images back in [0, 1]."""
    return split.images * PIXEL_STD + PIXEL_MEAN


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


def make_domains(test: Split, seed: int = 0) -> dict[str, Split]:
    """The shifted test domains, built from pixel values in [0, 1].

    Returns:
      ``{'clean', 'contrast_brightness', 'noise', 'contrast_brightness+noise',
      'inverted'}``: contrast halved and brightness raised by 0.3 (an affine
      change of the one input channel), Gaussian noise of standard deviation
      0.3, both, and ``1 - x``.
    """
    x = _pixels(test)
    noise = np.random.default_rng([seed, 1234]).normal(0.0, 0.3, x.shape).astype(np.float32)
    affine = 0.5 * x + 0.3
    return {
        name: Split(_standardize(images), test.labels)
        for name, images in (
            ("clean", x),
            ("contrast_brightness", affine),
            ("noise", x + noise),
            ("contrast_brightness+noise", affine + noise),
            ("inverted", 1.0 - x),
        )
    }


def _accuracy_running(apply: Callable, variables: Any, split: Split, chunk: int = 1000) -> float:
    correct = 0
    for s in range(0, len(split), chunk):
        logits = apply(variables, jnp.asarray(split.images[s : s + chunk]))
        correct += int(jnp.sum(jnp.argmax(logits, -1) == split.labels[s : s + chunk]))
    return correct / len(split)


def _accuracy_batch_stats(apply_train: Callable, variables: Any, split: Split, size: int) -> float:
    """Accuracy when each batch of ``size`` is normalized with its own statistics.

    The last incomplete batch is left out.
    """
    n = len(split) // size * size
    correct = 0
    for s in range(0, n, size):
        logits, _ = apply_train(variables, jnp.asarray(split.images[s : s + size]))
        correct += int(jnp.sum(jnp.argmax(logits, -1) == split.labels[s : s + size]))
    return correct / max(n, 1)


def prior_apply(model: Any, form: str) -> Callable:
    """``(variables, xs, prior) -> logits`` for xs of shape (batches, size, ...).

    Each batch is normalized with its own statistics pooled with the running
    ones (``prior`` is traced, so every N shares one compilation per shape).
    """

    @jax.jit
    def apply(variables, xs, prior):
        with jbn.linen.use_prior(prior, prior_form=form):
            return jax.vmap(lambda x: model.apply(variables, x, train=False))(xs)

    return apply


def _accuracy_prior(apply: Callable, variables: Any, split: Split, size: int, prior) -> float:
    """Accuracy with prior-weighted statistics, batches of ``size``; the last partial one left out."""
    n = len(split) // size * size
    per_call = max(1, PRIOR_CHUNK // size) * size
    correct = 0
    for s in range(0, n, per_call):
        e = min(n, s + per_call)
        xs = jnp.asarray(split.images[s:e]).reshape(-1, size, *split.images.shape[1:])
        logits = apply(variables, xs, jnp.float32(prior)).reshape(e - s, -1)
        correct += int(jnp.sum(jnp.argmax(logits, -1) == split.labels[s:e]))
    return correct / max(n, 1)


def _accuracy_predict(predict: Callable, split: Split, size: int) -> float:
    """Accuracy of ``predict(batch)`` over batches of ``size``; the last partial one left out."""
    n = len(split) // size * size
    correct = 0
    for s in range(0, n, size):
        logits = predict(jnp.asarray(split.images[s : s + size]))
        correct += int(jnp.sum(jnp.argmax(logits, -1) == split.labels[s : s + size]))
    return correct / max(n, 1)


def offline_tent(model: Any, variables: Any, prior: float) -> jbn.linen.Tent:
    """TENT on ``model`` from ``variables``, with prior-weighted statistics of N = ``prior``."""
    return jbn.linen.Tent(
        lambda v, x: model.apply(v, x, train=False), variables, prior=float(prior)
    )


def tent_accuracy(
    tent: jbn.linen.Tent, adapt: Split, score: Split, size: int = TENT_BATCH
) -> float:
    """Offline TENT: one pass over ``adapt`` in batches of ``size``, then scored on ``score``.

    ``tent`` (an :func:`offline_tent`) is reset first, so the result is that of a
    fresh one while its compiled steps are reused across calls.
    """
    size = min(size, len(adapt), len(score))
    tent.reset()
    tent.adapt(
        jnp.asarray(adapt.images[s : s + size]) for s in range(0, len(adapt) - size + 1, size)
    )
    return _accuracy_predict(tent.predict, score, size)


def best_prior(records: list[dict[str, Any]], size: int) -> float:
    """The N of ``method="prior"`` at ``size`` with the best mean accuracy over the shifted domains."""
    means = {}
    for n in PRIORS:
        accs = [
            r["test_accuracy"]
            for r in records
            if r["method"] == "prior"
            and r.get("batch_size") == size
            and r.get("prior") == n
            and r["domain"] != "clean"
        ]
        if accs:
            means[n] = float(np.mean(accs))
    return max(means, key=means.get)


def _is_bn_param(path: tuple[Any, ...]) -> bool:
    return any("BatchNorm" in str(getattr(k, "key", k)) for k in path)


def finetune_batch_norms(
    model: Any, variables: Any, adapt: Split, config: Config
) -> tuple[Any, float]:
    """Fine-tunes only the batch-norm scales and biases on labeled images.

    Adam (learning rate 1e-2) for ``config.finetune_steps`` steps of 32 images
    drawn from the first ``config.finetune_examples`` images of ``adapt``; every
    other parameter stays frozen (its update is zero). The running statistics
    follow the new domain's batches with the layers' momentum.

    Returns:
      The new variables and the fraction of parameters that were trainable.
    """
    n = min(config.finetune_examples, len(adapt))
    images, labels = jnp.asarray(adapt.images[:n]), jnp.asarray(adapt.labels[:n])
    mask = jax.tree_util.tree_map_with_path(lambda p, _: _is_bn_param(p), variables["params"])
    tx = optax.masked(optax.adam(1e-2), mask)
    frozen = optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask))
    tx = optax.chain(tx, frozen)
    batch = min(32, n)

    @jax.jit
    def step(variables, opt_state, idx):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, images[idx], train=True, mutable=["batch_stats"]
            )
            return cross_entropy(logits, labels[idx]).mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
        delta, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], delta)
        return {**variables, **updates, "params": params}, opt_state

    opt_state = tx.init(variables["params"])
    rng = np.random.default_rng([config.seed, 99])
    for _ in range(config.finetune_steps):
        variables, opt_state = step(variables, opt_state, rng.choice(n, batch, replace=False))
    sizes = jax.tree.map(lambda a: a.size, variables["params"])
    trainable = sum(
        s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask), strict=True) if m
    )
    return variables, trainable / sum(jax.tree.leaves(sizes))


def run_domain_shift(
    config: Config,
    workdir: str | pathlib.Path | None = None,
    datasets: tuple[Split, Split] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measures the trained model of ``workdir`` on shifted test domains.

    The model is the training run of ``config`` in ``workdir`` (default
    ``config.out``): finished from its checkpoint if there is one, trained
    first if not.

    Returns:
      Records ``{'domain', 'method', 'batches', 'test_accuracy'}`` (``batches``
      is None where it does not apply); also written to ``domain_shift.json``,
      with the table in ``domain_shift.md`` and the figure in ``domain_shift.png``.
    """
    workdir = pathlib.Path(config.out if workdir is None else workdir)
    if not config.overwrite:
        check_fresh_out(workdir, DOMAIN_SHIFT_FILES, resumable=False)
    if datasets is None:
        datasets = get_datasets(config, log=log)
    if config.norm == "none":
        raise ValueError("--domain-shift needs a model with batch norm, not --norm none")
    train_config = dataclasses.replace(config, mode="train", resume=True, overwrite=False)
    state, _ = train_and_evaluate(train_config, workdir, datasets=datasets, log=log)
    state = jax.device_get(state)
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    model = create_model(config, axis_name=None)
    apply_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))
    apply_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))

    prior_fns = {form: prior_apply(model, form) for form in PRIOR_METHODS.values()}
    tent = offline_tent(model, trained, 0.0)  # one for every domain, reset before each
    t0 = time.time()
    records: list[dict[str, Any]] = []
    half = len(datasets[1]) // 2
    for domain, split in make_domains(datasets[1], config.seed).items():
        adapt = Split(split.images[:half], split.labels[:half])
        score = Split(split.images[half:], split.labels[half:])

        def record(
            method: str, batches: int | None, acc: float, domain: str = domain, **extra: Any
        ) -> None:
            records.append(
                {
                    "domain": domain,
                    "method": method,
                    "batches": batches,
                    **extra,
                    "test_accuracy": acc,
                }
            )

        record("stale", None, _accuracy_running(apply_eval, trained, score))
        size = min(RECALIBRATION_BATCH, len(adapt))
        all_batches = [
            jnp.asarray(adapt.images[s : s + size]) for s in range(0, len(adapt) - size + 1, size)
        ]
        for k in sorted({1, min(10, len(all_batches)), len(all_batches)}):
            if k == 0:
                continue
            variables = jbn.recalibrate_batch_stats(apply_train, trained, all_batches[:k])
            record("recalibrated", k, _accuracy_running(apply_eval, variables, score))
        tuned, _ = finetune_batch_norms(model, trained, adapt, config)
        record("bn_finetuned", None, _accuracy_running(apply_eval, tuned, score))
        for size in (b for b in BATCH_STATS_SIZES if b <= len(score)):
            record(
                f"batch_stats_{size}",
                None,
                _accuracy_batch_stats(apply_train, trained, score, size),
            )
        for method, form in PRIOR_METHODS.items():
            for size in (b for b in PRIOR_SIZES if b <= len(score)):
                for n in PRIORS:
                    acc = _accuracy_prior(prior_fns[form], trained, score, size, n)
                    record(method, None, acc, batch_size=size, prior=n)
        size = min(TENT_BATCH, len(adapt), len(score))
        acc = tent_accuracy(tent, adapt, score, size)
        record("tent", None, acc, batch_size=size, prior=0)
        log(
            f"domain {domain}: "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in _row(records, domain))
        )
    tent_size = min(TENT_BATCH, half, len(datasets[1]) - half)
    n_best = best_prior(records, max(b for b in PRIOR_SIZES if b <= tent_size))
    tent = offline_tent(model, trained, n_best)
    for domain, split in make_domains(datasets[1], config.seed).items():
        adapt = Split(split.images[:half], split.labels[:half])
        score = Split(split.images[half:], split.labels[half:])
        acc = tent_accuracy(tent, adapt, score, tent_size)
        records.append(
            {
                "domain": domain,
                "method": "tent_prior",
                "batches": None,
                "batch_size": tent_size,
                "prior": n_best,
                "test_accuracy": acc,
            }
        )
        log(f"domain {domain}: tent_prior (N = {n_best}) {100 * acc:.2f}%")

    scoring = {
        domain: Split(split.images[half:], split.labels[half:])
        for domain, split in make_domains(datasets[1], config.seed).items()
    }
    streams = stream_records(model, trained, scoring, log=log)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(workdir / "domain_shift_streams.json", json.dumps(streams, indent=1).encode())
    atomic_write(workdir / "domain_shift_streams.md", stream_table(streams).encode())
    plot_streams(workdir / "domain_shift_streams.png", streams)
    log(stream_table(streams))
    atomic_write(workdir / "domain_shift.json", json.dumps(records, indent=1).encode())
    table = domain_shift_table(records, adapt_images=half, finetune=config)
    atomic_write(workdir / "domain_shift.md", table.encode())
    plot_domain_shift(workdir / "domain_shift.png", records)
    log(table)
    log(f"domain shift: {time.time() - t0:.0f}s; wrote {workdir / 'domain_shift.png'}, .md, .json")
    return records


def _row(records: list[dict[str, Any]], domain: str) -> list[tuple[str, float]]:
    return [
        (_column(r).replace(" ", "_"), r["test_accuracy"]) for r in records if r["domain"] == domain
    ]


def _column(record: dict[str, Any]) -> str:
    if record["method"] == "recalibrated":
        return f"recalibrated ({record['batches']} batch{'es' if record['batches'] > 1 else ''})"
    if record["method"] in PRIOR_METHODS or record["method"].startswith("tent"):
        label = "prior, linear mix" if record["method"] == "prior_linear" else record["method"]
        return f"{label.replace('_', ' ')} N={record['prior']:g}, batch {record['batch_size']}"
    if record["method"].startswith("batch_stats_"):
        return f"batch statistics, batch {record['method'].rsplit('_', 1)[1]}"
    return record["method"].replace("_", " ")


def prior_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of the prior grid: one row per (form, batch size, N), one column per domain."""
    grid = [r for r in records if r["method"] in PRIOR_METHODS]
    if not grid:
        return ""
    domains = list(dict.fromkeys(r["domain"] for r in grid))
    shifted = [d for d in domains if d != "clean"]
    keys = list(dict.fromkeys((r["method"], r["batch_size"], r["prior"]) for r in grid))
    cell = {
        (r["method"], r["batch_size"], r["prior"], r["domain"]): r["test_accuracy"] for r in grid
    }
    lines = [
        "| statistics | batch | N | " + " | ".join(domains) + " | mean of the shifted |",
        "|---|---:|---:|" + "---:|" * (len(domains) + 1),
    ]
    for method, size, n in keys:
        accs = [cell.get((method, size, n, d)) for d in domains]
        mean = np.mean(
            [cell[(method, size, n, d)] for d in shifted if (method, size, n, d) in cell]
        )
        form = PRIOR_METHODS[method]
        values = " | ".join("" if a is None else f"{100 * a:.2f} %" for a in accs)
        lines.append(f"| {form} | {size} | {n:g} | {values} | {100 * mean:.2f} % |")
    lines.append(
        "\n(prior-weighted statistics: each test batch is normalized with the running "
        "statistics, counted as N images, pooled with the batch's own; "
        "'pooled' is the exact pooled variance (Chan), 'linear' the paper's mix without the "
        "between-groups term. N = 0 is the batch statistics.)\n"
    )
    return "\n".join(lines)


def domain_shift_table(records: list[dict[str, Any]], adapt_images: int, finetune: Config) -> str:
    """Markdown tables: one row per domain, one column per method; then the prior grid."""
    grid = prior_table(records)
    records = [r for r in records if r["method"] not in PRIOR_METHODS]
    columns = list(dict.fromkeys(_column(r) for r in records))
    domains = list(dict.fromkeys(r["domain"] for r in records))
    cell = {(r["domain"], _column(r)): r["test_accuracy"] for r in records}
    lines = [
        "| domain | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for d in domains:
        values = " | ".join(
            f"{100 * cell[(d, c)]:.2f} %" if (d, c) in cell else "" for c in columns
        )
        lines.append(f"| {d} | {values} |")
    lines.append(
        f"\n(test accuracy on the second half of each domain's test set; recalibration on up to "
        f"batches of {RECALIBRATION_BATCH} unlabeled images of the first half ({adapt_images} "
        f"images), fine-tuning on {min(finetune.finetune_examples, adapt_images)} labeled ones "
        f"for {finetune.finetune_steps} steps. Batch size 1 cannot work with batch "
        "statistics: each feature's variance over one image is 0, so every batch-norm output "
        "after the dense layer is its bias and all predictions are equal.)\n"
    )
    return "\n".join(lines) + ("\n" + grid if grid else "")
