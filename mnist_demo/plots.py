"""The demo's figures (matplotlib, drawn off-screen, each written atomically)."""

from __future__ import annotations

import io
import pathlib
from typing import Any

import numpy as np

from .files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_epochs(ax: Any) -> None:
    # Epochs are whole numbers: no ticks at 1.5, 2.5, ...
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: pathlib.Path) -> None:
    """Writes ``fig`` as a PNG to ``path`` atomically (:func:`~mnist_demo.files.atomic_write`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())


def plot_curves(path: pathlib.Path, history: list[dict[str, float]], title: str) -> None:
    """Saves a PNG of training and test loss and accuracy against epoch."""
    plt = _pyplot()
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
        _integer_epochs(ax)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_fig1(path: pathlib.Path, results: dict[str, Any]) -> None:
    """Draws the three panels of the paper's Fig. 1."""
    plt = _pyplot()
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
        # One row at the top, above the data (the headroom below keeps it free).
        ax.legend(loc="upper center", ncols=3, fontsize=8)
    lo = min(np.min(results[n]["percentiles"]) for n in ("baseline", "batchnorm"))
    hi = max(np.max(results[n]["percentiles"]) for n in ("baseline", "batchnorm"))
    pad = 0.05 * (hi - lo)
    for ax in axes[1:]:
        ax.set_ylim(lo - pad, hi + 4 * pad)
    fig.suptitle(
        f"MNIST, 3x100 sigmoid MLP, SGD lr {results['learning_rate']}, "
        f"batch {results['batch_size']} (Ioffe & Szegedy 2015, Fig. 1)"
    )
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_lr_sweep(path: pathlib.Path, results: dict[str, Any]) -> None:
    """Final accuracy against learning rate, and accuracy against step at each rate."""
    plt = _pyplot()
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
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_compare(
    path: pathlib.Path, histories: dict[str, list[dict[str, Any]]], title: str
) -> None:
    """Test accuracy and test loss against epoch, one line per run."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax1.plot(epochs, [100 * h["test_accuracy"] for h in history], "o-", label=name)
        ax2.plot(epochs, [h["test_loss"] for h in history], "o-", label=name)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax2.set(xlabel="epoch", ylabel="test cross-entropy loss", yscale="log", title="test loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        _integer_epochs(ax)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_domain_shift(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
    """Grouped bars: test accuracy per domain and method; accuracy against the prior N.

    Records with a ``prior`` grid (``method`` "prior" or "prior_linear") are drawn
    in a second panel: the mean accuracy over the shifted domains against N, one
    line per batch size (solid: pooled, dashed: linear mix).
    """
    plt = _pyplot()
    grid = [r for r in records if r["method"] in ("prior", "prior_linear")]
    records = [r for r in records if r["method"] not in ("prior", "prior_linear")]
    domains = list(dict.fromkeys(r["domain"] for r in records))
    keys = list(
        dict.fromkeys((r["method"], r["batches"]) for r in records)
    )  # columns in order of first appearance
    if grid:
        fig, (ax, ax2) = plt.subplots(
            1, 2, figsize=(18, 4.5), gridspec_kw={"width_ratios": (13, 5)}
        )
        _plot_prior_grid(ax2, grid)
    else:
        fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(keys)
    for j, (method, batches) in enumerate(keys):
        values = [
            next(
                (
                    100 * r["test_accuracy"]
                    for r in records
                    if r["domain"] == d and r["method"] == method and r["batches"] == batches
                ),
                np.nan,
            )
            for d in domains
        ]
        label = method + (f" ({batches} batch{'es' if batches != 1 else ''})" if batches else "")
        ax.bar(np.arange(len(domains)) + j * width, values, width, label=label)
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="MNIST under a domain shift")
    ax.grid(alpha=0.3, axis="y")
    # Beside the axes, where it covers no bar.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def _plot_prior_grid(ax: Any, grid: list[dict[str, Any]]) -> None:
    """Mean accuracy over the shifted domains against N, per batch size and form."""
    priors = sorted({r["prior"] for r in grid})
    sizes = sorted({r["batch_size"] for r in grid})
    x = np.arange(len(priors))
    for k, size in enumerate(sizes):
        for method, style in (("prior", "-"), ("prior_linear", "--")):
            ys = []
            for n in priors:
                accs = [
                    r["test_accuracy"]
                    for r in grid
                    if r["method"] == method
                    and r["batch_size"] == size
                    and r["prior"] == n
                    and r["domain"] != "clean"
                ]
                ys.append(100 * np.mean(accs) if accs else np.nan)
            label = f"batch {size}, " + ("pooled" if method == "prior" else "linear")
            ax.plot(x, ys, style, marker="o", color=f"C{k}", label=label)
    ax.set_xticks(x, [f"{n:g}" for n in priors])
    ax.set(
        xlabel="prior N (images the running statistics count as)",
        ylabel="mean accuracy, shifted domains (%)",
        title="prior-weighted statistics",
    )
    ax.grid(alpha=0.3)
    # Beside the axes: inside, it would cover the batch-128 curves at the top.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_streams(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
    """Streamed test-time adaptation: one column per order, bars per batch size.

    Top row: the mean accuracy over the shifted domains; bottom row: clean accuracy
    (for the ``continual`` order: its last segment, clean again after the shifts);
    one bar per method (the records of :func:`mnist_demo.streams.stream_records`).
    """
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in records))
    orders = list(dict.fromkeys(r["order"] for r in records))
    sizes = sorted({r["batch_size"] for r in records})
    last = max((r["segment"] for r in records if "segment" in r), default=None)

    def accuracy(method: str, order: str, size: int, clean: bool) -> float:
        accs = [
            100 * r["test_accuracy"]
            for r in records
            if (r["method"], r["order"], r["batch_size"]) == (method, order, size)
            and (r["domain"] == "clean") == clean
            and (not clean or r.get("segment", last) == last)
        ]
        return float(np.mean(accs)) if accs else np.nan

    def clean_title(order: str) -> str:
        return "clean again" if order == "continual" else "clean"

    per = 6 if len(orders) <= 2 else 4.5  # inches per column
    fig, axes = plt.subplots(2, len(orders), figsize=(per * len(orders) + 2.5, 7), squeeze=False)
    width = 0.8 / len(methods)
    for col, order in enumerate(orders):
        rows = ((False, "shifted domains (mean)"), (True, clean_title(order)))
        for row, (clean, what) in enumerate(rows):
            ax = axes[row][col]
            for j, method in enumerate(methods):
                values = [accuracy(method, order, s, clean) for s in sizes]
                ax.bar(np.arange(len(sizes)) + j * width, values, width, label=method)
            ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, [f"batch {s}" for s in sizes])
            ax.set(ylabel=f"{what} accuracy (%)", ylim=(0, 100), title=f"{order} stream: {what}")
            ax.grid(alpha=0.3, axis="y")
    # Beside the axes, where it covers no bar.
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
