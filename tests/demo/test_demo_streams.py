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
    assert {(r["method"], r["order"], r["batch_size"], r["domain"]) for r in records} == {
        (m, o, b, d) for m in methods for o in streams.ORDERS for b in (8,) for d in domains
    }
    assert all(r["prior"] in streams.PRIORS for r in records if r["method"] == "prior")
    assert len(lines) == 2
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
