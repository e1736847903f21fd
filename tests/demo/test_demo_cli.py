"""Tests of the demo's command line: the generated parser and every check before work."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
from helpers import write_dataset

from mnist_demo import cli, mnist
from mnist_demo import config as demo_config
from mnist_demo.config import Config, ConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"), 64, 32)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_config_is_the_default_run():
    c = demo_config.parse_config([])
    assert c == Config() == demo_config.default_config()
    assert (c.model, c.norm, c.epochs, c.batch_size, c.learning_rate) == (
        "cnn",
        "jbn",
        5,
        128,
        3e-3,
    )
    assert (c.optimizer, c.schedule, c.augment_shift, c.out) == ("adam", "cosine", 2, "runs/mnist")


def test_every_field_has_one_flag_of_its_name():
    parser = demo_config.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(Config):
        if f.name == "mode":
            assert {"--fig1", "--lr-sweep"} <= flags
        else:
            assert demo_config.flag(f.name) in flags, f.name
    assert "--devices" in flags and "--num-devices" not in flags


def test_flags_reach_the_config():
    c = demo_config.parse_config(
        ["--fig1", "--lr", "0.3", "--devices", "2", "--no-verify", "--sweep-lrs", "0.1,1"]
    )
    assert (c.mode, c.learning_rate, c.devices, c.verify) == ("fig1", 0.3, 2, False)
    assert c.sweep_lrs == (0.1, 1.0)
    assert demo_config.parse_config(["--fig1"]).learning_rate == 0.5  # Fig. 1's default


def test_resumable_fields():
    resumable = Config.resumable_fields()
    assert {"devices", "eval_batch_size", "progress", "out", "resume"} <= resumable
    assert not {"epochs", "learning_rate", "model", "norm", "seed", "batch_size"} & resumable


BAD = [
    (["--epochs", "0"], "--epochs must be a positive integer; got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer; got 0"),
    (["--batch-size", "-128"], "--batch-size must be a positive integer; got -128"),
    (["--train-limit", "-100"], "--train-limit must be an integer >= 0; got -100"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be a positive integer; got 0"),
    (["--fig1", "--eval-every", "0"], "--eval-every must be a positive integer; got 0"),
    (
        ["--fig1", "--fig1-steps", "7", "--eval-every", "5"],
        "--eval-every 5 must divide --fig1-steps 7",
    ),
    (["--lr-sweep", "--sweep-steps", "30", "--eval-every", "20"], "must divide --sweep-steps 30"),
    (["--lr", "nan"], "--lr/--learning-rate must be a finite number > 0; got nan"),
    (["--lr", "inf"], "--lr/--learning-rate must be a finite number > 0; got inf"),
    (["--lr", "-1"], "--lr/--learning-rate must be a finite number > 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--bn-momentum", "1.5"], "--bn-momentum must be in [0, 1]"),
    (["--bn-epsilon", "0"], "--bn-epsilon must be a finite number > 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0"),
    (["--augment-shift", "14"], "--augment-shift must be in [0, 13]"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--devices", "-2"], "--devices must be an integer >= 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0"),
    (["--log-every", "0"], "--log-every must be a positive integer"),
    (["--init-std", "0"], "--init-std must be a finite number > 0"),
    (["--fig1-unit", "100"], "--fig1-unit must be in [0, 99]"),
    (["--sweep-lrs", "0.1,-1"], "--sweep-lrs must be a comma-separated list of finite numbers"),
    (["--sweep-lrs", "a,b"], "not a comma-separated list of numbers"),
    (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["--fig1", "--lr-sweep"], "not allowed with argument"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--fig1", "--resume"], "--resume only continues training runs"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # Checks of flags against each other, before MNIST is read.
    (
        ["--train-limit", "100", "--batch-size", "128"],
        "--batch-size 128 is larger than --train-limit 100: no full batch to train on; use a "
        "smaller --batch-size or a larger --train-limit",
    ),
    (["--batch-size", "60001"], "--batch-size 60001 is larger than the 60000 MNIST training"),
    (
        ["--lr-sweep", "--train-limit", "50"],
        "--fig1-batch-size 60 is larger than --train-limit 50",
    ),
    (
        ["--domain-shift", "--norm", "flax"],
        "--domain-shift needs --norm jbn, not --norm flax: it recalibrates the running "
        "statistics with jbn.recalibrate_batch_stats, which recalibrates jbn.BatchNorm layers only",
    ),
    (["--domain-shift", "--norm", "none"], "--domain-shift needs --norm jbn, not --norm none"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    # Any attempt to read data (the first work of a run) fails the test.
    monkeypatch.setattr(cli, "get_datasets", lambda *a, **k: pytest.fail("data was read"))
    rc, out, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and out == ""


def test_config_checks_apply_to_the_api_too():
    with pytest.raises(ConfigError, match="--batch-size must be a positive integer"):
        dataclasses.replace(Config(), batch_size=0)


def test_unwritable_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "get_datasets", lambda *a, **k: pytest.fail("data was read"))
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cli(capsys, "--out", str(tmp_path / "file" / "out"))
    assert rc == 2 and err.count("\n") == 1
    assert f"--out {tmp_path / 'file' / 'out'}: not a writable directory" in err
    rc, _, err = run_cli(capsys, "--out", str(tmp_path / "file"))
    assert rc == 2 and "not a writable directory" in err


def test_too_many_devices_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "get_datasets", lambda *a, **k: pytest.fail("data was read"))
    rc, _, err = run_cli(capsys, "--devices", "99", "--out", str(tmp_path))
    assert rc == 2 and "--devices 99, but only" in err and err.count("\n") == 1


def test_cli_offline_error(no_mnist_anywhere, capsys):
    rc, _, err = run_cli(
        capsys,
        "--no-download",
        "--data-dir",
        str(no_mnist_anywhere / "empty"),
        "--out",
        str(no_mnist_anywhere / "out"),
    )
    assert rc == 2
    assert "MNIST data not found" in err and "t10k-labels-idx1-ubyte.gz" in err
    assert f"{no_mnist_anywhere / 'empty'}: no such directory" in err


def test_explicit_data_dir_not_silently_replaced(tiny_dir, tmp_path, capsys, monkeypatch):
    # A complete data set in $JBN_DATA_DIR is not used when --data-dir names another place.
    monkeypatch.setenv("JBN_DATA_DIR", str(tiny_dir))
    rc, _, err = run_cli(
        capsys, "--data-dir", str(tmp_path / "nonexistent"), "--no-download", "--out", str(tmp_path)
    )
    assert rc == 2 and f"{tmp_path / 'nonexistent'}: no such directory" in err


def test_cli_run_refuses_to_overwrite(tiny_dir, tmp_path, capsys):
    args = ["--data-dir", str(tiny_dir), "--no-verify", "--no-download", "--no-progress"]
    args += ["--model", "mlp", "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match="verification is OFF"):
        rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and f"MNIST from {tiny_dir}" in out
    before = (tmp_path / "checkpoint.msgpack").read_bytes()
    rc, out, err = run_cli(capsys, *args, "--norm", "none")
    assert rc == 2 and err.count("\n") == 1
    assert "already holds an earlier run's results" in err
    assert "--resume" in err and "fresh --out" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint.msgpack").read_bytes() == before
    # --resume of the finished run is allowed and says so.
    with pytest.warns(UserWarning):
        rc, out, _ = run_cli(capsys, *args, "--resume")
    assert rc == 0 and "all 1 epochs already done" in out


def test_cli_damaged_checkpoint(tiny_dir, tmp_path, capsys):
    args = ["--data-dir", str(tiny_dir), "--no-verify", "--no-download", "--no-progress"]
    args += ["--model", "mlp", "--epochs", "2", "--batch-size", "32", "--out", str(tmp_path)]
    (tmp_path / "checkpoint.msgpack").write_bytes(b"jbn-mnist-checkpoint 2 sha256=00\nxx")
    with pytest.warns(UserWarning):
        rc, _, err = run_cli(capsys, *args, "--resume")
    assert rc == 2 and err.count("\n") == 1
    assert str(tmp_path / "checkpoint.msgpack") in err and "damaged checkpoint" in err


def test_cli_checkpoint_of_another_width(tiny_dir, tmp_path, capsys):
    # A checkpoint with a valid checksum and the run's settings, but a wider first layer
    # (another version of the demo, say): one line, before anything is restored or trained.
    import jax
    import numpy as np

    from mnist_demo import checkpoints, models, train

    args = ["--data-dir", str(tiny_dir), "--no-verify", "--no-download", "--no-progress"]
    args += ["--model", "mlp", "--epochs", "2", "--batch-size", "32", "--out", str(tmp_path)]
    config = demo_config.parse_config([*args, "--resume"])
    model = models.create_model(config)
    shapes = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), config, model, 2))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # no compilation
    state = state.replace(params={**state.params, "Dense_0": {"kernel": np.zeros((784, 300))}})
    checkpoints.save_checkpoint(tmp_path, state, checkpoints.Progress(), config)
    with pytest.warns(UserWarning):
        rc, out, err = run_cli(capsys, *args, "--resume")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {tmp_path / 'checkpoint.msgpack'}: its arrays do not fit")
    assert (
        "params/Dense_0/kernel has shape (784, 300) in the checkpoint, (784, 512) in the model"
        in err
    )
    assert "resuming" not in out


def test_cli_non_finite_loss(tiny_dir, tmp_path, capsys):
    # A learning rate so large that the loss overflows: a nonzero exit naming the step.
    args = ["--data-dir", str(tiny_dir), "--no-verify", "--no-download", "--no-progress"]
    args += ["--model", "mlp", "--norm", "none", "--optimizer", "sgd", "--schedule", "constant"]
    args += ["--lr", "1e30", "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path)]
    with pytest.warns(UserWarning):
        rc, _, err = run_cli(capsys, *args)
    assert rc == 1 and err.count("\n") == 1
    assert "error: training loss is" in err and "at step" in err
    assert not (tmp_path / "metrics.json").exists()


def test_leftover_tmp_of_any_output_removed(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise mnist.MNISTError("stop")

    monkeypatch.setattr(cli, "get_datasets", no_data)
    stale = tmp_path / "fig1.json.abc.tmp"
    stale.write_bytes(b"x")
    rc, out, _ = run_cli(capsys, "--fig1", "--eval-every", "0", "--out", str(tmp_path))
    assert rc == 2 and stale.exists()  # a bad value: nothing is touched
    rc, out, err = run_cli(capsys, "--fig1", "--out", str(tmp_path))
    assert rc == 2 and "error: stop" in err
    assert not stale.exists() and f"removed {stale}" in out
