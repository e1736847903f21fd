"""One-epoch smoke tests of ``--domain-shift`` and ``--compare`` on tiny synthetic data."""

from __future__ import annotations

import json

import pytest
from helpers import write_dataset

from mnist_demo import cli

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
    records = json.loads((tmp_path / "domain_shift.json").read_text())
    assert all(set(r) == {"domain", "method", "batches", "test_accuracy"} for r in records)
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
    assert methods == {"stale", "recalibrated", "bn_finetuned", "batch_stats_8"}
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
