"""Test-time adaptation on streams: the shifted domains streamed in test-set order and sorted.

Each domain's scoring half is streamed twice, iid (the test set's order) and
sorted (a stable sort by label, so every batch holds one or two classes), in
batches of 1, 8 and 64 (the last partial batch left out), each batch scored as
it comes. :func:`stream_records` measures:

- ``stale``: the running (training) statistics;
- ``batch_stats``: each batch normalized with its own statistics;
- ``prior``: prior-weighted statistics (:func:`jbn.linen.use_prior`) at the N
  of :data:`PRIORS` with the best mean over the shifted domains in that cell;
- ``stream``: the stream mode with its defaults (:class:`jbn.Stream`), the
  memory carried through a ``lax.scan`` over the batches;
- ``tent_stream``: online TENT with the stream statistics
  (``jbn.linen.Tent(..., stream=jbn.Stream())``), a step per batch, then its
  prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jbn

from .data import Split

ORDERS = ("iid", "sorted")
SIZES = (1, 8, 64)
PRIORS = (1, 4, 16, 64, 256)


def ordered(split: Split, order: str) -> Split:
    """``split`` in test-set order (``"iid"``) or stably sorted by label (``"sorted"``)."""
    if order == "iid":
        return split
    idx = np.argsort(split.labels, kind="stable")
    return Split(split.images[idx], split.labels[idx])


def _batches(split: Split, size: int) -> tuple[jax.Array, np.ndarray]:
    n = len(split) // size * size
    xs = jnp.asarray(split.images[:n]).reshape(n // size, size, *split.images.shape[1:])
    return xs, split.labels[:n]


def scan_predictions(model: Any, mode: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """``(variables, xs) -> predicted classes`` for batches ``xs`` of shape (batches, size, ...).

    ``mode`` is False (the running statistics), a :class:`jbn.Prior` or a
    :class:`jbn.Stream`, whose memory is carried from batch to batch.
    """

    @jax.jit
    def run(variables: Any, xs: jax.Array) -> jax.Array:
        def body(stats: Any, x: jax.Array) -> tuple[Any, jax.Array]:
            v = {**variables, "batch_stats": stats}
            if isinstance(mode, jbn.Stream):
                with jbn.linen.use_stream(mode):
                    logits, updates = model.apply(v, x, train=False, mutable=["batch_stats"])
                return updates["batch_stats"], jnp.argmax(logits, -1)
            with jbn.linen.use_prior(mode.n if isinstance(mode, jbn.Prior) else None):
                return stats, jnp.argmax(model.apply(v, x, train=False), -1)

        stats = variables["batch_stats"]
        if isinstance(mode, jbn.Stream):  # a carry of fixed structure for the scan
            stats = jbn.linen.start_stream(variables, mode)["batch_stats"]
        return jax.lax.scan(body, stats, xs)[1]

    return run


def tent_stream_accuracy(model: Any, variables: Any, split: Split, size: int) -> float:
    """Online TENT with the stream statistics: a step per batch, then its prediction."""
    tent = jbn.linen.Tent(
        lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]),
        variables,
        stream=jbn.Stream(),
    )
    xs, labels = _batches(split, size)
    predicted = [np.asarray(jnp.argmax(tent.step(x), -1)) for x in xs]
    return float(np.mean(np.concatenate(predicted) == labels))


def stream_records(
    model: Any,
    variables: Any,
    domains: dict[str, Split],
    log: Callable[[str], None] = print,
    sizes: tuple[int, ...] = SIZES,
) -> list[dict[str, Any]]:
    """Records ``{"method", "order", "batch_size", "domain", "test_accuracy"}`` (and ``"prior"``).

    Args:
      model: the linen model (``model.apply(variables, x, train=False)``).
      variables: its trained variables.
      domains: the scoring split of each domain (``"clean"`` among them).
      log: where a line per cell goes.
      sizes: the batch sizes (those larger than a domain are left out).
    """
    fixed = {
        "stale": scan_predictions(model, False),
        "batch_stats": scan_predictions(model, jbn.Prior(0.0)),
        "stream": scan_predictions(model, jbn.Stream()),
    }
    priors = {n: scan_predictions(model, jbn.Prior(float(n))) for n in PRIORS}
    records: list[dict[str, Any]] = []
    shortest = min(len(s) for s in domains.values())
    for order in ORDERS:
        streams = {d: ordered(s, order) for d, s in domains.items()}
        for size in (b for b in sizes if b <= shortest):
            cell = {"order": order, "batch_size": size}
            results = {m: _accuracies(run, variables, streams, size) for m, run in fixed.items()}
            grid = {n: _accuracies(run, variables, streams, size) for n, run in priors.items()}
            best = max(grid, key=lambda n: shifted_mean(grid[n]))
            results["tent_stream"] = {
                d: tent_stream_accuracy(model, variables, s, size) for d, s in streams.items()
            }
            for method, accs in results.items():
                records += [
                    {"method": method, **cell, "domain": d, "test_accuracy": a}
                    for d, a in accs.items()
                ]
            records += [
                {"method": "prior", **cell, "prior": best, "domain": d, "test_accuracy": a}
                for d, a in grid[best].items()
            ]
            summary = ", ".join(
                f"{m} {100 * shifted_mean(a):.1f}% ({100 * a['clean']:.1f})"
                for m, a in {**results, f"prior N={best}": grid[best]}.items()
            )
            log(f"{order} stream, batch {size}: {summary}")
    return records


def _accuracies(
    run: Callable[[Any, jax.Array], jax.Array], variables: Any, streams: dict[str, Split], size: int
) -> dict[str, float]:
    out = {}
    for d, split in streams.items():
        xs, labels = _batches(split, size)
        out[d] = float(np.mean(np.asarray(run(variables, xs)).reshape(-1) == labels))
    return out


def shifted_mean(accs: dict[str, float]) -> float:
    """The mean accuracy over the domains other than ``"clean"``."""
    return float(np.mean([a for d, a in accs.items() if d != "clean"]))


def stream_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per (order, batch size), one column per method.

    Each cell is the mean accuracy over the shifted domains, with clean accuracy
    in brackets (and N for the prior).
    """
    methods = list(dict.fromkeys(r["method"] for r in records))
    cells = list(dict.fromkeys((r["order"], r["batch_size"]) for r in records))
    lines = [
        "| stream | batch | " + " | ".join(m.replace("_", " ") for m in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for order, size in cells:
        values = []
        for m in methods:
            rs = [
                r
                for r in records
                if r["method"] == m and r["order"] == order and r["batch_size"] == size
            ]
            accs = {r["domain"]: r["test_accuracy"] for r in rs}
            note = f", N = {rs[0]['prior']:g}" if "prior" in rs[0] else ""
            values.append(f"{100 * shifted_mean(accs):.1f} % ({100 * accs['clean']:.1f}{note})")
        lines.append(f"| {order} | {size} | " + " | ".join(values) + " |")
    lines.append(
        "\n(mean accuracy over the shifted domains, clean accuracy in brackets; each domain's "
        "scoring half streamed in test-set order (iid) or sorted by label, every batch scored "
        "as it comes.)\n"
    )
    return "\n".join(lines)
