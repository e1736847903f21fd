"""The stream study of ``--domain-shift`` (:mod:`mnist_demo.streams`) on tiny random data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jbn
from mnist_demo import streams
from mnist_demo.data import Split
from mnist_demo.models import MLP


def test_stream_records_on_tiny_data():
    model = MLP(norm=jbn.BatchNorm, hidden=(16,))
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (24, 28, 28, 1)).astype(np.float32)
    labels = np.tile(np.arange(3), 8)
    variables = model.init(jax.random.key(0), images[:2])
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    domains = {"clean": Split(images, labels), "noise": Split(images * 2.0 + 1.0, labels)}
    lines = []
    records = streams.stream_records(model, variables, domains, log=lines.append, sizes=(8,))
    methods = {"stale", "batch_stats", "stream", "tent_stream", "prior"}
    single = [r for r in records if r["order"] in streams.ORDERS]
    assert {(r["method"], r["order"], r["batch_size"], r["domain"]) for r in single} == {
        (m, o, b, d) for m in methods for o in streams.ORDERS for b in (8,) for d in domains
    }
    # The continual and mixed orders, for every method but TENT: a record per segment / domain.
    joint = [r for r in records if r not in single]
    assert {(r["method"], r["order"], r.get("segment"), r["domain"]) for r in joint} == {
        *((m, "continual", i, d) for m in methods - {"tent_stream"}
          for i, d in enumerate(["clean", "noise", "clean"])),
        *((m, "mixed", None, d) for m in methods - {"tent_stream"} for d in domains),
    }  # fmt: skip
    assert all(r["prior"] in streams.PRIORS for r in records if r["method"] == "prior")
    assert len(lines) == 4
    acc = {(r["method"], r["order"], r["batch_size"], r["domain"]): r["test_accuracy"]
           for r in records}  # fmt: skip
    # Independent references: the model itself in evaluation and training mode, per batch.
    for order in streams.ORDERS:
        split = streams.ordered(domains["noise"], order)
        xs = jnp.asarray(split.images).reshape(3, 8, 28, 28, 1)
        stale = [model.apply(variables, x, train=False) for x in xs]
        batch = [model.apply(variables, x, train=True, mutable=["batch_stats"])[0] for x in xs]
        for method, logits in (("stale", stale), ("batch_stats", batch)):
            want = np.mean(np.argmax(np.concatenate(logits), -1) == split.labels)
            assert acc[(method, order, 8, "noise")] == want
    sorted_labels = streams.ordered(domains["clean"], "sorted").labels
    assert np.all(np.diff(sorted_labels) >= 0)
    table = streams.stream_table(records)
    assert "| sorted | 8 |" in table and "tent stream" in table
    assert "| stream | 8 |" in table and "continual: clean again" in table


def test_continual_and_mixed_streams_match_the_model_batch_by_batch():
    model = MLP(norm=jbn.BatchNorm, hidden=(16,))
    rng = np.random.default_rng(1)
    images = rng.normal(0, 1, (20, 28, 28, 1)).astype(np.float32)
    labels = np.tile(np.arange(4), 5)
    variables = model.init(jax.random.key(1), images[:2])
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    domains = {
        "clean": Split(images, labels),
        "noise": Split(images * 2.0 + 1.0, labels),
        "inverted": Split(-images, labels),
    }
    mode = jbn.Stream(horizon=16.0, prior=8.0)  # short: the memory follows each segment
    runs = {
        "stale": streams.scan_predictions(model, False),
        "batch_stats": streams.scan_predictions(model, jbn.Prior(0.0)),
        "stream": streams.scan_predictions(model, mode),
        1: streams.scan_predictions(model, jbn.Prior(1.0)),
        16: streams.scan_predictions(model, jbn.Prior(16.0)),
    }
    lines = []
    records = streams.continual_records(variables, domains, runs, log=lines.append, sizes=(8,))
    assert len(lines) == 2
    assert {r["prior"] for r in records if r["method"] == "prior"} <= {1, 16}
    acc = {(r["method"], r["order"], r.get("segment", r["domain"])): r for r in records}

    def stream_loop(batches):
        """The stream mode batch by batch in Python, the memory carried in batch_stats."""
        v, predicted = variables, []
        for x in batches:
            with jbn.linen.use_stream(mode):
                logits, updates = model.apply(v, x, train=False, mutable=["batch_stats"])
            v = {**v, **updates}
            predicted.append(np.asarray(jnp.argmax(logits, -1)))
        return np.concatenate(predicted)

    # Continual: clean, noise, inverted, clean; 16 of each 20 images (no batch straddles two).
    segments = [domains[d] for d in ("clean", "noise", "inverted", "clean")]
    kept = [Split(s.images[:16], s.labels[:16]) for s in segments]
    batches = [jnp.asarray(s.images[i : i + 8]) for s in kept for i in (0, 8)]
    stream = stream_loop(batches).reshape(4, 16)
    for i, s in enumerate(kept):
        stale = np.argmax(model.apply(variables, s.images, train=False), -1)
        batch = [
            np.argmax(model.apply(variables, x, train=True, mutable=["batch_stats"])[0], -1)
            for x in (s.images[:8], s.images[8:])
        ]
        for method, predicted in (("stale", stale), ("batch_stats", np.concatenate(batch)),
                                  ("stream", stream[i])):  # fmt: skip
            record = acc[(method, "continual", i)]
            assert record["test_accuracy"] == np.mean(predicted == s.labels), (method, i)
            assert record["examples"] == 16
            assert record["domain"] == ("clean", "noise", "inverted", "clean")[i]

    # Mixed: the 60 images shuffled with the fixed seed, 56 scored (7 batches of 8).
    order = np.random.default_rng(streams.MIXED_SEED).permutation(60)
    all_images = np.concatenate([s.images for s in domains.values()])[order][:56]
    all_labels = np.concatenate([s.labels for s in domains.values()])[order][:56]
    origin = np.repeat(np.arange(3), 20)[order][:56]
    stale = (
        np.asarray(jnp.argmax(model.apply(variables, all_images, train=False), -1)) == all_labels
    )
    stream = stream_loop(jnp.asarray(all_images).reshape(7, 8, 28, 28, 1)) == all_labels
    for method, correct in (("stale", stale), ("stream", stream)):
        rows = [acc[(method, "mixed", d)] for d in domains]
        for i, r in enumerate(rows):
            assert r["examples"] == np.sum(origin == i)
            assert r["test_accuracy"] == np.mean(correct[origin == i])
        # The accuracies per domain of origin recombine to the whole stream's.
        overall = sum(r["examples"] * r["test_accuracy"] for r in rows) / 56
        np.testing.assert_allclose(overall, np.mean(correct), rtol=1e-12)
    table = streams.joint_table(records)
    assert table.count("\n| ") == 4  # a row per method at batch 8
