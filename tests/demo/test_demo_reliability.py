"""The demo under faults: concurrent runs, signals, full disks, ``~`` in paths.

- One run owns its ``--out``: a second run into it is refused at once (exit 2),
  naming the first (its pid).
- The ``--processes`` launcher passes SIGTERM and SIGHUP on to its processes,
  waits for them (kills them after a grace period) and exits with 128 + the
  signal; the run then continues with ``--resume``.
- An output file that cannot be written mid-run (full disk, no permission) ends
  the run with one ``error:`` line naming it (exit 1); the last complete
  checkpoint is kept.
- Path flags are expanded once (``~``, ``$VAR``), and the expanded path is used.

Tiny synthetic data (:func:`helpers.write_dataset`); the real two-process run
that is stopped by SIGTERM and resumed is ``slow``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import serialization
from helpers import REPO, assert_trees_close, tiny_config, write_dataset

from mnist_demo import checkpoints, cli, data, distributed, mnist, train
from mnist_demo.checkpoints import CHECKPOINT_NAME
from mnist_demo.config import parse_config

TIMEOUT_S = 180
QUIET = ["--no-verify", "--no-download", "--no-progress"]

pytestmark = pytest.mark.filterwarnings("ignore:MNIST checksum verification is OFF")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


def tiny_args(tiny_dir, out, *extra) -> list[str]:
    """A one-epoch MLP run of 16 steps on the tiny data."""
    args = ["--data-dir", str(tiny_dir), *QUIET, "--model", "mlp", "--epochs", "1"]
    return [*args, "--batch-size", "32", "--out", str(out), *extra]


def one_device_env() -> dict[str, str]:
    """This environment for a subprocess run: one CPU device, the worktree importable."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop(distributed.COORDINATOR_ENV, None)
    return env


def gone(pid: int) -> bool:
    """Whether no process ``pid`` exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


# --------------------------------------------------------------------------
# One run owns its output directory.
# --------------------------------------------------------------------------


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    from mnist_demo.lock import LOCK_NAME, OutInUseError, OutLock

    first = OutLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    with pytest.raises(OutInUseError) as info:
        OutLock(tmp_path).acquire()
    message = str(info.value)
    assert f"--out {tmp_path} is in use by another run (pid {os.getpid()} on host " in message
    assert "choose another --out" in message
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()  # released: the file is gone
    # A lock file left by a killed run (nobody holds it) is taken over.
    (tmp_path / LOCK_NAME).write_text("999999999 elsewhere\n")
    with OutLock(tmp_path) as second:
        assert second.held
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


def test_two_concurrent_runs_into_one_out(tmp_path, tiny_dir):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "train_mnist.py"), *tiny_args(tiny_dir, out)]
    command += ["--epochs", "3"]  # long enough that the second run starts while it runs
    runs = [
        subprocess.Popen(
            command,
            env=one_device_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(2)
    ]
    try:
        # The first to end is the refused one, and it ends while the other still runs.
        deadline = time.time() + TIMEOUT_S
        while all(r.poll() is None for r in runs) and time.time() < deadline:
            time.sleep(0.02)
        ended = [r for r in runs if r.poll() is not None]
        assert len(ended) == 1, [r.returncode for r in runs]
        loser = ended[0]
        winner = runs[1 - runs.index(loser)]
        out_l, err_l = loser.communicate()
        out_w, err_w = winner.communicate(timeout=TIMEOUT_S)
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
                r.wait()
    assert winner.returncode == 0, err_w[-3000:]
    assert loser.returncode == 2, err_l[-3000:]
    assert err_l.count("\n") == 1 and err_l.startswith("error: --out "), err_l
    assert f"is in use by another run (pid {winner.pid} on host" in err_l
    assert "MNIST from" not in out_l  # refused before reading any data
    # The winner's results are whole and its own; the lock is gone with it.
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir()) == sorted(train.RESULT_FILES)


def test_launcher_holds_the_lock_only_while_it_checks(tmp_path, tiny_dir, monkeypatch, capsys):
    from mnist_demo.lock import OutLock

    out = tmp_path / "out"
    seen = []

    def fake_launch(config, argv, **kwargs):
        # Process 0 must be able to take the lock: the launcher has let it go.
        with OutLock(out):
            seen.append(argv)
        return 0

    monkeypatch.setattr(distributed, "launch", fake_launch)
    argv = tiny_args(tiny_dir, out, "--processes", "2")
    assert cli.main(argv) == 0 and len(seen) == 1
    # While another run holds --out, the launcher stops before starting anything.
    with OutLock(out):
        rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(seen) == 1
    assert err.count("\n") == 1 and f"(pid {os.getpid()} on host" in err


# --------------------------------------------------------------------------
# Signals to the --processes launcher.
# --------------------------------------------------------------------------

# A stand-in for train_mnist.py: process 1 ignores SIGTERM and SIGHUP (so the launcher
# must kill it after the grace period), process 0 ends at them as a real run does.
FAKE = """
import os, signal, sys, time
argv = sys.argv[1:]
i = int(argv[argv.index("--process-id") + 1])
if i == 1:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
with open(os.path.join(os.environ["READY_DIR"], str(i)), "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
"""

LAUNCHER = """
import sys
from mnist_demo import distributed
from mnist_demo.config import parse_config
distributed.GRACE_S = 2.0
config = parse_config(["--processes", "2"])
sys.exit(distributed.launch(config, ["--processes", "2"], script=sys.argv[1]))
"""


@contextlib.contextmanager
def launched(tmp_path, stand_in: str, **popen):
    """LAUNCHER over ``stand_in`` (a stand-in for train_mnist.py), once both its processes run.

    Yields the launcher and its processes' pids; kills whatever is left at the end
    (no orphans, whatever happened).
    """
    script = tmp_path / "stand_in.py"
    script.write_text(stand_in)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = dict(one_device_env(), READY_DIR=str(ready))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(script)], env=env, **popen)
    pids = []
    try:
        deadline = time.time() + 60
        while len(list(ready.iterdir())) < 2 and time.time() < deadline:
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(0.05)
        time.sleep(0.2)  # the files are written
        pids = [int((ready / str(i)).read_text()) for i in range(2)]
        yield launcher, pids
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_launcher_passes_on_signals_and_waits(tmp_path, signum):
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with launched(tmp_path, FAKE, **pipes) as (launcher, pids):
        t0 = time.time()
        launcher.send_signal(signum)
        out, err = launcher.communicate(timeout=30)
        elapsed = time.time() - t0
        left = [pid for pid in pids if not gone(pid)]  # before the clean-up kills them
    assert launcher.returncode == 128 + signum, (out, err)
    assert not left
    assert 1.5 < elapsed < 2.0 + 5.0  # process 1 was killed after the grace period of 2 s
    assert err.count("error: ") == 1 and f"error: stopped by {signal.Signals(signum).name}" in err
    assert "--resume" in err
    assert f"process ids (pids): {pids[0]}, {pids[1]}" in out


# A stand-in for train_mnist.py that watches its launcher, as a real run's processes do.
WATCHING = """
import os, sys, time
from mnist_demo import distributed
distributed.WATCH_S = 0.1
distributed.watch_launcher()
argv = sys.argv[1:]
i = int(argv[argv.index("--process-id") + 1])
with open(os.path.join(os.environ["READY_DIR"], str(i)), "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
"""


def test_processes_end_when_the_launcher_is_killed(tmp_path):
    # SIGKILL leaves the launcher no chance to pass anything on: each process
    # notices that its parent is gone and ends (no orphan trains on into --out).
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with launched(tmp_path, WATCHING, **quiet) as (launcher, pids):
        assert not any(gone(pid) for pid in pids)
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 10
        while not all(gone(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.05)
        assert all(gone(pid) for pid in pids)


def test_watch_launcher_is_a_no_op_outside_the_launcher(monkeypatch):
    monkeypatch.delenv(distributed.LAUNCHER_ENV, raising=False)
    distributed.watch_launcher()  # would end this process if it took the test for orphaned
    monkeypatch.setenv(distributed.LAUNCHER_ENV, str(os.getppid()))
    distributed.watch_launcher()  # its parent runs: it watches, and this process goes on
    assert distributed.child_env()[distributed.LAUNCHER_ENV] == str(os.getpid())


def _run_processes(tiny_dir, out, *extra, **popen):
    flags = ["--data-dir", str(tiny_dir), *QUIET, "--epochs", "2", "--batch-size", "32"]
    flags += ["--lr", "3e-3", "--eval-batch-size", "100", "--checkpoint-every", "3"]
    command = [sys.executable, str(REPO / "train_mnist.py"), "--processes", "2", *flags]
    env = one_device_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return subprocess.Popen(
        [*command, "--out", str(out), *extra], env=env, text=True, cwd=out.parent, **popen
    )


@pytest.mark.slow  # ~90-140 s on 2 cores: run with -m slow
def test_sigterm_to_two_processes_then_resume(tmp_path, tiny_dir):
    out = tmp_path / "run"
    launcher = _run_processes(tiny_dir, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids: list[int] = []
    try:
        line = launcher.stdout.readline()
        while line and "process ids (pids):" not in line:
            line = launcher.stdout.readline()
        pids = [int(p) for p in line.split(":")[-1].split(",")]
        deadline = time.time() + TIMEOUT_S
        ckpt = out / CHECKPOINT_NAME
        while not ckpt.exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        # Hold the processes where they are, so that the signal reaches them
        # mid-run however fast this machine trains (on an idle CI machine the
        # tiny run once finished between the first checkpoint and the signal).
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        # Process 0, and it alone, holds the lock of --out.
        assert (out / ".lock").read_text().split()[0] == str(pids[0])
        t0 = time.time()
        launcher.send_signal(signal.SIGTERM)
        # The launcher passes SIGTERM on. Fatal as it is now, it ends a stopped process
        # at once; one that handled it (JAX's preemption service did) would get it
        # when continued.
        time.sleep(0.5)
        for pid in pids:
            if not gone(pid):
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:  # it ended meanwhile
                    pass
        _, err = launcher.communicate(timeout=distributed.GRACE_S + 30)
        elapsed = time.time() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 143, err[-3000:]
    # They ended at the signal, not killed after the grace period (JAX's preemption
    # service once caught SIGTERM, and the processes trained on).
    assert elapsed < distributed.GRACE_S - 2 and all(gone(pid) for pid in pids)
    progress = json.loads(checkpoints.read_payload(out / CHECKPOINT_NAME)["progress"])
    assert progress["epoch"] < 2, progress  # stopped mid-run, after a checkpoint

    resumed = _run_processes(
        tiny_dir, out, "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    r_out, r_err = resumed.communicate(timeout=TIMEOUT_S)
    assert resumed.returncode == 0, r_out[-3000:] + r_err[-3000:]
    assert "resuming from" in r_out
    history = json.loads((out / "metrics.json").read_text())

    # The uninterrupted run, in this process on one device, with the same global batches;
    # its checkpoint after epoch 1 is kept for the second resume below.
    from_one = tmp_path / "from_one"
    from_one.mkdir()

    def keep_epoch_1(line: str) -> None:
        if line.startswith("epoch   1/2"):  # the end-of-epoch checkpoint is written
            shutil.copy(tmp_path / "uninterrupted" / CHECKPOINT_NAME, from_one / CHECKPOINT_NAME)

    splits = data.get_datasets(tiny_config(tiny_dir), log=lambda s: None)
    config = tiny_config(tiny_dir, devices=1, epochs=2)
    state, expected = train.train_and_evaluate(
        config, tmp_path / "uninterrupted", datasets=splits, log=keep_epoch_1
    )
    assert [h["epoch"] for h in history] == [1, 2]
    for got, want in zip(history, expected, strict=True):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)

    # A one-process run's checkpoint (after epoch 1) resumed in two processes ends there
    # too: parameters and statistics as well as the metrics (merged here from a test of
    # its own, which trained the same uninterrupted run again).
    assert len(checkpoints.read_payload(from_one / CHECKPOINT_NAME)["state"]["params"]) > 0
    resumed = _run_processes(
        tiny_dir, from_one, "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    r_out, r_err = resumed.communicate(timeout=TIMEOUT_S)
    assert resumed.returncode == 0, r_out[-3000:] + r_err[-3000:]
    assert r_out.count("resuming from") == 1 and "epoch   1/2" not in r_out
    saved = checkpoints.read_payload(from_one / CHECKPOINT_NAME)["state"]
    one = serialization.to_state_dict(jax.device_get(state))
    assert_trees_close(
        {"params": saved["params"], "batch_stats": saved["batch_stats"]},
        {"params": one["params"], "batch_stats": one["batch_stats"]},
    )
    history = json.loads((from_one / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(history[1][key], expected[1][key], rtol=1e-5, err_msg=key)


# --------------------------------------------------------------------------
# Output files that cannot be written mid-run.
# --------------------------------------------------------------------------


def fail_writes(monkeypatch, out, name: str, code: int, after: int = 0) -> list[int]:
    """Makes the ``fsync`` of ``out/<name>``'s temporary file fail with ``code``.

    The first ``after`` writes of that file succeed. Returns the list of attempts
    (one entry per write of the file).
    """
    real_fsync = os.fsync
    attempts: list[int] = []

    def fsync(fd):
        ino = os.fstat(fd).st_ino
        if any(p.stat().st_ino == ino for p in out.glob(f"{name}.*.tmp")):
            attempts.append(fd)
            if len(attempts) > after:
                raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return attempts


@pytest.mark.parametrize(
    "name,code,after",
    [
        (CHECKPOINT_NAME, errno.ENOSPC, 1),  # the second checkpoint, at step 10 of 16
        ("curves.png", errno.EACCES, 0),  # the last file of the run
    ],
)
def test_write_error_mid_run_is_one_line_and_keeps_the_checkpoint(
    tmp_path, tiny_dir, monkeypatch, capsys, name, code, after
):
    out = tmp_path / "out"
    argv = tiny_args(tiny_dir, out, "--checkpoint-every", "5")
    with monkeypatch.context() as m:
        attempts = fail_writes(m, out, name, code, after)
        rc = cli.main(argv)
    _, err = capsys.readouterr()
    assert rc == 1, err
    assert len(attempts) == after + 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: could not write {out / name}: {os.strerror(code)}"), err
    assert "--resume" in err
    assert not list(out.glob("*.tmp"))
    progress = json.loads(checkpoints.read_payload(out / CHECKPOINT_NAME)["progress"])
    if name == CHECKPOINT_NAME:  # the checkpoint of step 5 is kept
        assert (progress["epoch"], progress["step_in_epoch"]) == (0, 5)
    else:  # the end-of-epoch checkpoint and the metrics were written before
        assert (progress["epoch"], progress["step_in_epoch"]) == (1, 0)
        assert len(json.loads((out / "metrics.json").read_text())) == 1


def test_metrics_write_error_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    history = [{"epoch": 1, "test_accuracy": 0.5}]
    train.write_metrics(tmp_path, history)
    before = (tmp_path / "metrics.json").read_bytes()
    fail_writes(monkeypatch, tmp_path, "metrics.json", errno.ENOSPC)
    with pytest.raises(OSError) as info:
        train.write_metrics(tmp_path, [*history, {"epoch": 2, "test_accuracy": 0.6}])
    assert (
        str(info.value) == f"could not write {tmp_path / 'metrics.json'}: No space left on device"
    )
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json"]


def test_unreadable_data_is_one_line(tmp_path, tiny_dir, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tiny_dir / "x.gz"))

    monkeypatch.setattr(mnist, "_read_bytes", denied)
    rc = cli.main(tiny_args(tiny_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {tiny_dir / 'x.gz'}: Permission denied\n"


# --------------------------------------------------------------------------
# Paths: expanded once, when parsed.
# --------------------------------------------------------------------------


def test_path_flags_expanded_once(tmp_path, tiny_dir, monkeypatch, capsys):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TINY_MNIST", str(tiny_dir))
    monkeypatch.chdir(cwd)
    config = parse_config(["--out=~/x", "--data-dir=$TINY_MNIST"])
    assert (config.out, config.data_dir) == (str(home / "x"), str(tiny_dir))

    # The run writes where the checks looked (the training itself is left out).
    def train_and_evaluate(config, **kwargs):
        assert len(kwargs["datasets"][0]) == 512  # the data came from $TINY_MNIST
        (pathlib.Path(config.out) / "metrics.json").write_text("[]")

    monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
    # Written "--out=~/x", the shell leaves the "~" to the program.
    args = ["--data-dir=$TINY_MNIST", *QUIET, "--model", "mlp", "--out=~/x"]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (home / "x").iterdir()) == ["metrics.json"]
    assert list(cwd.iterdir()) == []  # no literal ./~/x


# --------------------------------------------------------------------------
# Hints name flags valid in their mode.
# --------------------------------------------------------------------------


def test_batch_not_divisible_across_processes_does_not_suggest_devices(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config = tiny_config("unused", batch_size=6)
    with pytest.raises(ValueError) as info:
        train.check_devices(config)
    message = str(info.value)
    assert "--batch-size 6 is not divisible by the 4 devices in use (2 processes of 2)" in message
    assert "--devices" not in message and "XLA_FLAGS" in message
