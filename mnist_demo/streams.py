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

Two more orders put the domains in one stream (:func:`continual_records`), for
every method but ``tent_stream`` (its steps at batch 1 and 8 collapse on the
single-domain streams already):

- ``continual``: one stream, never reset, of the scoring halves of clean, the
  shifted domains, and clean again, in that order (each segment's partial last
  batch left out, so no batch straddles two segments); a record per segment
  (``"segment"`` 0, 1, ...): how fast a method follows a shift, and whether it
  comes back when the shift ends;
- ``mixed``: the scoring halves of all domains shuffled together (a fixed seed,
  :data:`MIXED_SEED`), the accuracy per domain of origin: a method that follows
  the stream must not chase every example's domain.

The prior's N is again the best of :data:`PRIORS` in that cell, by the mean over
the shifted domains (segments 1 to 4 of ``continual``); ``"examples"`` counts
the images each record scores.
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
# The orders that stream all domains in one stream (see :func:`continual_records`).
JOINT_ORDERS = ("continual", "mixed")
SIZES = (1, 8, 64)
PRIORS = (1, 4, 16, 64, 256)
# The seed of the shuffle that mixes the domains.
MIXED_SEED = 0


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


def tent_stream(model: Any, variables: Any) -> jbn.linen.Tent:
    """Online TENT with the stream statistics (``jbn.Stream()``) from ``variables``."""
    return jbn.linen.Tent(
        lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]),
        variables,
        stream=jbn.Stream(),
    )


def tent_stream_accuracy(tent: jbn.linen.Tent, split: Split, size: int) -> float:
    """Online TENT with the stream statistics: a step per batch, then its prediction.

    ``tent`` (a :func:`tent_stream`) is reset first, so the result is that of a
    fresh one while its compiled steps are reused across calls.
    """
    tent.reset()
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

    The orders of :data:`ORDERS` stream each domain alone, those of
    :data:`JOINT_ORDERS` all domains in one stream (:func:`continual_records`).

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
    tent = tent_stream(model, variables)  # one for every stream, reset before each
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
                d: tent_stream_accuracy(tent, s, size) for d, s in streams.items()
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
    records += continual_records(variables, domains, {**fixed, **priors}, log, sizes)
    return records


def continual(domains: dict[str, Split], size: int) -> tuple[Split, np.ndarray]:
    """The ``continual`` stream: clean, the shifted domains, clean again, in batches of ``size``.

    Each segment is its domain in test-set order less its partial last batch,
    so no batch straddles two segments.

    Returns:
      The stream, and the segment of each of its images.
    """
    names = ["clean", *(d for d in domains if d != "clean"), "clean"]
    kept = [len(domains[d]) // size * size for d in names]
    images = np.concatenate([domains[d].images[:n] for d, n in zip(names, kept, strict=True)])
    labels = np.concatenate([domains[d].labels[:n] for d, n in zip(names, kept, strict=True)])
    return Split(images, labels), np.repeat(np.arange(len(names)), kept)


def mixed(domains: dict[str, Split], seed: int = MIXED_SEED) -> tuple[Split, np.ndarray]:
    """The ``mixed`` stream: every domain's images shuffled together (``np.random.default_rng``).

    Returns:
      The stream, and the index in ``domains`` of each image's domain of origin.
    """
    splits = list(domains.values())
    origin = np.repeat(np.arange(len(splits)), [len(s) for s in splits])
    order = np.random.default_rng(seed).permutation(len(origin))
    images = np.concatenate([s.images for s in splits])[order]
    labels = np.concatenate([s.labels for s in splits])[order]
    return Split(images, labels), origin[order]


def continual_records(
    variables: Any,
    domains: dict[str, Split],
    runs: dict[Any, Callable[[Any, jax.Array], jax.Array]],
    log: Callable[[str], None] = print,
    sizes: tuple[int, ...] = SIZES,
) -> list[dict[str, Any]]:
    """The ``continual`` and ``mixed`` records of every method of ``runs`` at each batch size.

    Args:
      variables: the model's trained variables.
      domains: the scoring split of each domain (``"clean"`` among them).
      runs: the methods' scans (:func:`scan_predictions`), by method name, and by N for
        the prior's grid (:data:`PRIORS`), of which the best N is kept.
      log: where a line per cell goes.
      sizes: the batch sizes (those larger than a domain are left out).

    Returns:
      ``continual``: ``{"method", "order", "batch_size", "segment", "domain", "examples",
      "test_accuracy"}`` per segment; ``mixed``: the same without ``"segment"``, per domain
      of origin; the prior's records with ``"prior"``.
    """
    names = list(domains)
    records: list[dict[str, Any]] = []
    shortest = min(len(s) for s in domains.values())
    for size in (b for b in sizes if b <= shortest):
        stream, segment = continual(domains, size)
        segments = ["clean", *(d for d in names if d != "clean"), "clean"]
        parts = {"continual": (stream, segment, segments), "mixed": (*mixed(domains), names)}
        for order, (split, part, part_names) in parts.items():
            cell = {"order": order, "batch_size": size}
            correct = _correct(runs, variables, split, size)
            n = len(correct[next(iter(correct))])
            part = part[:n]  # the mixed stream's partial last batch is left out
            per = {m: _per_part(c, part, part_names) for m, c in correct.items()}
            grid = {m: p for m, p in per.items() if not isinstance(m, str)}
            best = max(grid, key=lambda m: _shifted(grid[m])) if grid else None
            for m, rows in per.items():
                if isinstance(m, str) or m == best:
                    extra = {} if isinstance(m, str) else {"prior": m}
                    name = m if isinstance(m, str) else "prior"
                    for i, (domain, examples, acc) in enumerate(rows):
                        where = {"segment": i} if order == "continual" else {}
                        records.append(
                            {
                                "method": name,
                                **cell,
                                **extra,
                                **where,
                                "domain": domain,
                                "examples": examples,
                                "test_accuracy": acc,
                            }  # fmt: skip
                        )
            summary = ", ".join(
                f"{m if isinstance(m, str) else f'prior N={m}'} {100 * _shifted(per[m]):.1f}%"
                for m in per
                if isinstance(m, str) or m == best
            )
            log(f"{order} stream, batch {size}: shifted {summary}")
    return records


def _correct(
    runs: dict[Any, Callable[[Any, jax.Array], jax.Array]], variables: Any, split: Split, size: int
) -> dict[Any, np.ndarray]:
    xs, labels = _batches(split, size)
    return {m: np.asarray(run(variables, xs)).reshape(-1) == labels for m, run in runs.items()}


def _per_part(
    correct: np.ndarray, part: np.ndarray, names: list[str]
) -> list[tuple[str, int, float]]:
    """(domain, examples, accuracy) of each part (segment or domain of origin)."""
    out = []
    for i, d in enumerate(names):
        n = int(np.sum(part == i))
        out.append((d, n, float(np.mean(correct[part == i])) if n else float("nan")))
    return out


def _shifted(rows: list[tuple[str, int, float]]) -> float:
    return float(np.mean([a for d, _, a in rows if d != "clean"]))


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
    """Markdown tables: the single-domain streams, then the continual and mixed ones.

    The first table has one row per (order, batch size) of :data:`ORDERS`, one
    column per method; each cell is the mean accuracy over the shifted domains,
    with clean accuracy in brackets (and N for the prior). The second, if the
    records hold the orders of :data:`JOINT_ORDERS`, is :func:`joint_table`.
    """
    single = [r for r in records if r["order"] in ORDERS]
    methods = list(dict.fromkeys(r["method"] for r in single))
    cells = list(dict.fromkeys((r["order"], r["batch_size"]) for r in single))
    lines = [
        "| stream | batch | " + " | ".join(m.replace("_", " ") for m in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for order, size in cells:
        values = []
        for m in methods:
            rs = [
                r
                for r in single
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
    joint = joint_table(records)
    return "\n".join(lines) + ("\n" + joint if joint else "")


def joint_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of the ``continual`` and ``mixed`` orders ("" if there are none).

    One row per (method, batch size); columns: the continual stream's first clean
    segment, mean over its shifted segments and returning clean segment, then the
    mixed stream's clean images and mean over its shifted domains (and N for the
    prior, per order).
    """
    joint = [r for r in records if r["order"] in JOINT_ORDERS]
    if not joint:
        return ""
    lines = [
        "| method | batch | continual: clean | continual: shifted (mean) | continual: clean "
        "again | mixed: clean | mixed: shifted (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, size in dict.fromkeys((r["method"], r["batch_size"]) for r in joint):
        cell = [r for r in joint if (r["method"], r["batch_size"]) == (method, size)]
        c = [r for r in cell if r["order"] == "continual"]
        m = [r for r in cell if r["order"] == "mixed"]
        last = max((r["segment"] for r in c), default=0)
        values = [
            _percent([r for r in c if r["segment"] == 0]),
            _percent([r for r in c if r["domain"] != "clean"]) + _prior_note(c),
            _percent([r for r in c if r["segment"] == last and r["domain"] == "clean"]),
            _percent([r for r in m if r["domain"] == "clean"]),
            _percent([r for r in m if r["domain"] != "clean"]) + _prior_note(m),
        ]
        lines.append(f"| {method.replace('_', ' ')} | {size} | " + " | ".join(values) + " |")
    lines.append(
        "\n(continual: one stream, never reset, of the clean scoring half, the shifted ones and "
        "clean again, accuracy per segment; mixed: all scoring halves shuffled together, "
        "accuracy per domain of origin, shifted: mean over the shifted domains.)\n"
    )
    return "\n".join(lines)


def _percent(records: list[dict[str, Any]]) -> str:
    """The mean accuracy of ``records`` in percent ("–" for none)."""
    if not records:
        return "–"
    return f"{100 * float(np.mean([r['test_accuracy'] for r in records])):.1f} %"


def _prior_note(records: list[dict[str, Any]]) -> str:
    return f", N = {records[0]['prior']:g}" if records and "prior" in records[0] else ""
