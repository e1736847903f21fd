"""BN against no BN in one command: the default CNN with jbn, flax's batch norm and none."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

from .config import Config
from .data import Split, get_datasets
from .files import atomic_write
from .plots import plot_compare
from .train import check_fresh_out, train_and_evaluate

COMPARE_FILES = ("compare.json", "compare.md", "compare.png")
NORMS = ("jbn", "flax", "none")


def run_compare(
    config: Config,
    workdir: str | pathlib.Path | None = None,
    datasets: tuple[Split, Split] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, float]]]:
    """Trains ``config``'s model with each of :data:`NORMS`, same seed and data order.

    Each run is an ordinary training run in ``workdir/<norm>`` (checkpoints,
    metrics, ``--resume`` and ``--overwrite`` work as for one run).

    Returns:
      The per-epoch history of each run, by norm; also written to
      ``compare.json``, with a table of final accuracy and time per epoch in
      ``compare.md`` and the curves in ``compare.png``.
    """
    workdir = pathlib.Path(config.out if workdir is None else workdir)
    if not (config.overwrite or config.resume):
        check_fresh_out(workdir, COMPARE_FILES, resumable=True)
    if datasets is None:
        datasets = get_datasets(config, log=log)
    histories: dict[str, list[dict[str, float]]] = {}
    t0 = time.time()
    for norm in NORMS:
        log(f"compare: norm={norm}")
        run = dataclasses.replace(config, mode="train", norm=norm)
        _, histories[norm] = train_and_evaluate(run, workdir / norm, datasets=datasets, log=log)
    atomic_write(workdir / "compare.json", json.dumps(histories, indent=1).encode())
    table = compare_table(histories)
    atomic_write(workdir / "compare.md", table.encode())
    plot_compare(workdir / "compare.png", histories, f"MNIST {config.model}: batch norm or not")
    log(table)
    log(f"compare: {time.time() - t0:.0f}s; wrote {workdir / 'compare.png'}, .md, .json")
    return histories


def compare_table(histories: dict[str, Any]) -> str:
    """Final test accuracy and loss and the mean time per epoch of each run."""
    labels = {"jbn": "jbn.BatchNorm", "flax": "flax.linen.BatchNorm", "none": "no batch norm"}
    lines = [
        "| normalization | test accuracy | test loss | seconds per epoch |",
        "|---|---:|---:|---:|",
    ]
    for norm, history in histories.items():
        last = history[-1]
        per_epoch = sum(h["epoch_seconds"] for h in history) / len(history)
        lines.append(
            f"| {labels.get(norm, norm)} | {100 * last['test_accuracy']:.2f} % "
            f"| {last['test_loss']:.4f} | {per_epoch:.1f} |"
        )
    lines.append(f"\n(after {histories[next(iter(histories))][-1]['epoch']} epochs)\n")
    return "\n".join(lines)
