"""The demo across processes: ``train_mnist.py --processes 2`` on tiny data.

One run of two processes on localhost (2 CPU devices each, CPU collectives over
gloo) trains the CNN with jbn's batch norm for one epoch of 16 steps; its
checkpoint and metrics must equal those of one process on one device with the
same global batches. The launcher, the flags' checks and the
data split are tested without starting JAX processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization
from helpers import REPO, assert_trees_close, tiny_config, write_dataset

from mnist_demo import cli, data, distributed, mnist, train
from mnist_demo.checkpoints import CHECKPOINT_NAME, read_payload
from mnist_demo.config import ConfigError, parse_config

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


def child_env() -> dict[str, str]:
    """This environment with 2 CPU devices per process (conftest's 4 are for this one)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop(distributed.COORDINATOR_ENV, None)
    return env


def saved_state(workdir):
    """The parameters and batch statistics of the checkpoint in ``workdir``."""
    state = read_payload(workdir / CHECKPOINT_NAME)["state"]
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def test_two_processes_match_one_process(tmp_path, tiny_dir):
    # One test, so that the processes start once even when pytest-xdist splits the file.
    flags = ["--data-dir", str(tiny_dir), "--no-verify", "--no-download", "--no-progress"]
    flags += ["--epochs", "1", "--batch-size", "32", "--lr", "3e-3", "--eval-batch-size", "100"]
    out = tmp_path / "two"
    command = [sys.executable, str(REPO / "train_mnist.py"), "--processes", "2", *flags]
    done = subprocess.run(
        [*command, "--out", str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # Process 0 alone logs: one line per epoch, on a mesh of both processes' devices.
    assert "4 device(s) (cpu, 2 processes); 16 steps/epoch of 32" in done.stdout, done.stdout
    assert done.stdout.count("epoch   1/1") == 1 and done.stdout.count("done in") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(train.RESULT_FILES)
    history = json.loads((out / "metrics.json").read_text())

    # One process, one device, on the same global batches (same seed, order, shifts).
    with pytest.warns(UserWarning, match="verification is OFF"):
        splits = data.get_datasets(tiny_config(tiny_dir), log=lambda s: None)
    two = saved_state(out)
    config = tiny_config(tiny_dir, devices=1)
    state, expected = train.train_and_evaluate(
        config, tmp_path / "one", datasets=splits, log=lambda s: None
    )
    one = serialization.to_state_dict(jax.device_get(state))
    one = {"params": one["params"], "batch_stats": one["batch_stats"]}
    assert_trees_close(two, one, rtol=1e-5)
    assert len(history) == len(expected) == 1
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(history[0][key], expected[0][key], rtol=1e-5, err_msg=key)
    # The comparison is not vacuous: training moved the parameters and statistics.
    assert history[0]["train_accuracy"] > 0.3
    means = [v for k, v in jax.tree_util.tree_leaves_with_path(two) if "mean" in str(k)]
    assert means and all(np.abs(m).max() > 1e-3 for m in means)


def test_shares_of_a_batch_get_the_shifts_of_the_whole_batch():
    images = np.random.default_rng(0).normal(size=(12, 28, 28, 1)).astype(np.float32)
    images[:, 0, 0, 0] = -5.0  # the same background value in every share
    whole = data.random_shift(images, 2, np.random.default_rng([0, 1, 2]))
    shares = [
        data.random_shift(
            images[rows], 2, np.random.default_rng([0, 1, 2]), rows=rows, batch_size=12
        )
        for rows in (slice(0, 4), slice(4, 8), slice(8, 12))
    ]
    np.testing.assert_array_equal(np.concatenate(shares), whole)
    assert not np.array_equal(whole, images)


def test_local_rows_of_one_process_are_the_whole_batch(four_devices):
    mesh = jax.sharding.Mesh(np.array(four_devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert distributed.local_rows(sharding, 32) == slice(0, 32)


BAD = [
    (["--coordinator", "localhost"], "--coordinator must be HOST:PORT with a port in [1, 65535]"),
    (["--coordinator", "h:0"], "--coordinator must be HOST:PORT"),
    (["--coordinator", ":80"], "--coordinator must be HOST:PORT"),
    (["--num-processes", "-1"], "--num-processes must be an integer >= 0; got -1"),
    (["--process-id", "-1"], "--process-id must be an integer >= 0; got -1"),
    (["--processes", "-2"], "--processes must be an integer >= 0; got -2"),
    (
        ["--num-processes", "2", "--process-id", "2"],
        "--process-id must be in [0, 2) for --num-processes 2; got 2",
    ),
    (["--processes", "2", "--process-id", "0"], "leave out --process-id"),
    (["--processes", "2", "--coordinator", "h:1"], "leave out --coordinator"),
    (["--processes", "2", "--fig1"], "only training runs go across processes, not --fig1"),
    (["--num-processes", "2", "--compare"], "only training runs go across processes"),
    (["--processes", "2", "--devices", "1"], "--devices does not apply to a run across processes"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_process_flags_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli, "get_datasets", lambda *a, **k: pytest.fail("data was read"))
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    rc = cli.main([*argv, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert out == ""


def test_batch_not_divisible_by_processes_before_any_work(no_mnist_anywhere, capsys, monkeypatch):
    # Refused before the data is looked for, with a hint valid with --processes.
    monkeypatch.setattr(mnist, "load_mnist", lambda *a, **k: pytest.fail("data was read"))
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    out = no_mnist_anywhere / "out"
    rc = cli.main(["--processes", "3", "--batch-size", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        "error: --batch-size 64 is not divisible by --processes 3: each process takes an equal "
        "share of every batch; use a multiple of 3\n"
    )
    assert "--devices" not in err


def test_bad_coordinator_in_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(distributed.COORDINATOR_ENV, "no-port")
    monkeypatch.setattr(cli, "get_datasets", lambda *a, **k: pytest.fail("data was read"))
    rc = cli.main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        "error: $JAX_COORDINATOR_ADDRESS must be HOST:PORT with a port in [1, 65535]; "
        "got 'no-port'\n"
    )


MISSING = """
import sys
from mnist_demo import cli
for argv in (["--coordinator", "localhost:1"], ["--num-processes", "2", "--process-id", "0"]):
    print(cli.main([*argv, "--out", sys.argv[1]]))
"""


def test_missing_process_settings(tmp_path):
    # In a fresh process: jax.distributed.initialize must come before JAX's backends start.
    done = subprocess.run(
        [sys.executable, "-c", MISSING, str(tmp_path / "out")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.stdout == "2\n2\n", done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "error: a run across processes needs --num-processes N: give it, or run under a "
        "cluster manager JAX reads it from (SLURM, Open MPI)",
        "error: a run across processes needs --coordinator HOST:PORT (or "
        "$JAX_COORDINATOR_ADDRESS): give it, or run under a cluster manager JAX reads it "
        "from (SLURM, Open MPI)",
    ]


def test_process_flags_reach_the_config():
    config = parse_config(["--coordinator", "10.0.0.1:1234", "--num-processes", "4"])
    assert (config.coordinator, config.num_processes, config.process_id) == (
        "10.0.0.1:1234",
        4,
        None,
    )
    assert distributed.is_distributed(config)
    with pytest.raises(ConfigError, match="--process-id must be in"):
        parse_config(["--num-processes", "1", "--process-id", "1"])


# A stand-in for train_mnist.py: process 1 fails at once, process 0 would wait forever.
FAKE = """
import sys, time
argv = sys.argv[1:]
i = int(argv[argv.index("--process-id") + 1])
assert argv[argv.index("--processes", argv.index("--processes") + 1) + 1] == "0"
if i == 1:
    print("process 1 gives up", file=sys.stderr)
    sys.exit(3)
time.sleep(60)
"""


def test_launcher_stops_the_others_when_one_fails(tmp_path, capsys):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    config = parse_config(["--processes", "2"])
    status = distributed.launch(config, ["--processes", "2"], script=script, log=print)
    out, err = capsys.readouterr()
    assert status == 3
    assert "starting 2 processes on localhost:" in out
    assert "process 1 gives up" in err
    assert "error: process 1 of 2 failed (exit status 3); stopped the others" in err


def test_launcher_passes_the_process_flags():
    argv = distributed.child_argv(["--epochs", "1"], 1, 2, 4321)
    config = parse_config(argv)
    assert (config.processes, config.coordinator, config.num_processes, config.process_id) == (
        0,
        "localhost:4321",
        2,
        1,
    )
