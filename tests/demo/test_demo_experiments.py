"""One-epoch smoke tests of ``--domain-shift`` and ``--compare`` on tiny synthetic data."""

from __future__ import annotations

import json

import pytest
from helpers import write_dataset

from mnist_demo import cli, shift

TINY = ["--no-verify", "--no-download", "--no-progress", "--model", "mlp"]
TINY += ["--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.mark.slow  # ~40-75 s on 2 cores: run with -m slow
def test_domain_shift_smoke(tiny_dir, tmp_path, capsys):
    argv = ["--domain-shift", "--data-dir", str(tiny_dir), *TINY, "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match="verification is OFF"):
        assert cli.main([*argv, "--finetune-steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "no checkpoint" in out  # there was no trained model: it trained one first
    assert (tmp_path / "checkpoint.msgpack").exists()
    for name in shift.DOMAIN_SHIFT_FILES:  # the stream study's table and figure too
        assert (tmp_path / name).stat().st_size > 0, name
    streamed = json.loads((tmp_path / "domain_shift_streams.json").read_text())
    continual = [r for r in streamed if r["order"] == "continual"]
    assert {r["method"] for r in continual} == {"stale", "batch_stats", "prior", "stream"}
    segments = {(r["segment"], r["domain"]) for r in continual}
    assert {i for i, _ in segments} == set(range(6))
    assert {d for i, d in segments if i in (0, 5)} == {"clean"}
    assert len({r["domain"] for r in streamed if r["order"] == "mixed"}) == 5
    assert "continual: clean again" in (tmp_path / "domain_shift_streams.md").read_text()
    records = json.loads((tmp_path / "domain_shift.json").read_text())
    base = {"domain", "method", "batches", "test_accuracy"}
    assert all(set(r) in (base, base | {"batch_size", "prior"}) for r in records)
    grid = [r for r in records if r["method"] in ("prior", "prior_linear")]
    assert {(r["method"], r["batch_size"], r["prior"]) for r in grid} == {
        (m, n, p) for m in ("prior", "prior_linear") for n in (1, 8) for p in shift.PRIORS
    }
    records = [r for r in records if r not in grid]
    domains = {r["domain"] for r in records}
    assert domains == {
        "clean",
        "contrast_brightness",
        "noise",
        "contrast_brightness+noise",
        "inverted",
    }
    acc = {(r["domain"], r["method"], r["batches"]): r["test_accuracy"] for r in records}
    methods = {m for _, m, _ in acc}
    assert methods == {
        "stale", "recalibrated", "bn_finetuned", "batch_stats_8", "tent", "tent_prior"
    }  # fmt: skip
    assert all(b is None for (_, m, b) in acc if m != "recalibrated")
    # An affine change of the input channel is what recalibration undoes.
    stale = acc[("contrast_brightness", "stale", None)]
    recalibrated = acc[("contrast_brightness", "recalibrated", 1)]
    assert recalibrated > stale + 0.05, (stale, recalibrated)
    table = (tmp_path / "domain_shift.md").read_text()
    assert "| contrast_brightness |" in table and "Batch size 1 cannot work" in table
    assert (tmp_path / "domain_shift.png").stat().st_size > 1000
    # Run again: the trained model is reused; the results are not overwritten.
    assert cli.main(argv) == 2
    assert "domain_shift.json" in capsys.readouterr().err


@pytest.mark.slow  # ~40-75 s on 2 cores: run with -m slow
def test_compare_smoke(tiny_dir, tmp_path, capsys):
    argv = ["--compare", "--data-dir", str(tiny_dir), *TINY, "--train-limit", "128"]
    with pytest.warns(UserWarning, match="verification is OFF"):
        assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    histories = json.loads((tmp_path / "compare.json").read_text())
    assert list(histories) == ["jbn", "flax", "none"]
    assert all(len(h) == 1 and 0 <= h[0]["test_accuracy"] <= 1 for h in histories.values())
    # Same seed and data order: jbn and flax train the same network alike.
    assert histories["jbn"][0]["train_loss"] == pytest.approx(
        histories["flax"][0]["train_loss"], rel=1e-4
    )
    table = (tmp_path / "compare.md").read_text()
    for label in ("jbn.BatchNorm", "flax.linen.BatchNorm", "no batch norm"):
        assert f"| {label} |" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000
    for norm in ("jbn", "flax", "none"):
        assert (tmp_path / norm / "checkpoint.msgpack").exists()


def test_prior_and_tent_rows_on_an_untrained_model(tiny_dir):
    """The new study rows' pieces, fast: prior-weighted accuracy, TENT, best N, the table."""
    import dataclasses

    import jax
    import numpy as np

    from mnist_demo.data import Split
    from mnist_demo.models import create_model
    from tests.helpers import tiny_config

    config = dataclasses.replace(tiny_config(tiny_dir), model="mlp")
    model = create_model(config, axis_name=None)
    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(16, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 16))
    variables = model.init(jax.random.key(0), split.images[:2], train=False)
    apply = shift.prior_apply(model, "pooled")
    for size in (1, 8):
        acc = shift._accuracy_prior(apply, variables, split, size, 4)
        assert 0.0 <= acc <= 1.0
    assert (
        0.0
        <= shift.tent_accuracy(shift.offline_tent(model, variables, 0.0), split, split, 8)
        <= 1.0
    )
    records = [
        {"domain": d, "method": m, "batches": None, "batch_size": 8, "prior": n,
         "test_accuracy": 0.5 + 0.01 * n * (d != "clean")}
        for d in ("clean", "noise") for m in shift.PRIOR_METHODS for n in shift.PRIORS
    ]  # fmt: skip
    assert shift.best_prior(records, 8) == max(shift.PRIORS)
    table = shift.prior_table(records)
    assert "| pooled | 8 | 256 |" in table and "mean of the shifted" in table
