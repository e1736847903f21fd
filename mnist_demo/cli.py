"""The command line of ``train_mnist.py``: parse and check, then run one mode.

Every value is checked before any data is read or any step is trained; each
failure prints one line starting with ``error:`` and returns a nonzero status:

- 2: refused before the run: a bad setting, ``--out`` in use by another run or
  holding an earlier run's results, missing, broken or unreadable data, an
  unusable checkpoint;
- 1: the run failed: the loss became non-finite, or an output file could not be
  written (full disk, no permission); the files written before, the last
  complete checkpoint among them, are kept.

A run holds the lock of its ``--out`` (:mod:`mnist_demo.lock`) from before it
looks at what is there until it ends; in a run across processes, process 0 alone.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import warnings
from collections.abc import Sequence

from . import compare, distributed, mnist, paper, shift, train
from .checkpoints import CheckpointError
from .config import Config, ConfigError, check_out_dir, parse_config
from .data import get_datasets
from .files import WriteError, remove_stale_tmp
from .lock import OutInUseError, OutLock
from .mnist import MNISTError

#: The errors that refuse a run before it starts (exit status 2).
REFUSED = (ConfigError, CheckpointError, FileExistsError, MNISTError, OutInUseError, ValueError)

DESCRIPTION = (
    "MNIST with batch normalization (jbn), and the batch-norm paper's Fig. 1. "
    "Trains a CNN with jbn.BatchNorm by default."
)
EPILOG = (
    "MNIST (the four IDX files, .gz or not) is read from --data-dir when it is given, "
    "and from nowhere else; otherwise it is looked for in $JBN_DATA_DIR, then in the "
    "repository's data/mnist (the copy a clone holds), then in ~/.cache/jbn/mnist. "
    "If it is not there, it is downloaded (unless --no-download) into the directory "
    "you named (--data-dir, else $JBN_DATA_DIR), never elsewhere; every file is "
    "checked against the SHA-256 of the official uncompressed file."
)


def _lock_out(out: pathlib.Path) -> OutLock:
    """Takes the lock of ``out``; raises at once if another run holds it."""
    try:
        return OutLock(out).acquire()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"--out {out}: cannot lock {out / '.lock'} ({reason})") from None


def _preflight_files(config: Config) -> OutLock:
    """The checks of ``--out``, before any data is read, under its lock.

    Returns:
      The lock of ``--out``, held; the caller releases it.
    """
    out = check_out_dir(config.out)
    lock = _lock_out(out)
    try:
        _check_out_contents(config, out)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_out_contents(config: Config, out: pathlib.Path) -> None:
    names = train.RESULT_FILES + paper.FIG1_FILES + paper.LR_SWEEP_FILES
    names += shift.DOMAIN_SHIFT_FILES + compare.COMPARE_FILES
    for tmp in remove_stale_tmp(out, list(names)):
        print(f"removed {tmp}, left over from an interrupted write")
    if config.mode == "train":
        if not (config.resume or config.overwrite):
            train.check_fresh_out(out, train.RESULT_FILES, resumable=True)
    elif config.mode == "compare":
        if not (config.resume or config.overwrite):
            train.check_fresh_out(out, compare.COMPARE_FILES, resumable=True)
    elif not config.overwrite:
        files = {
            "fig1": paper.FIG1_FILES,
            "lr_sweep": paper.LR_SWEEP_FILES,
            "domain_shift": shift.DOMAIN_SHIFT_FILES,
        }[config.mode]
        train.check_fresh_out(out, files, resumable=False)


def _preflight(config: Config, stack: contextlib.ExitStack) -> None:
    """The checks that need the file system or the devices, before any data is read.

    In a run across processes, process 0 alone checks (and creates) ``--out`` and
    holds its lock (released when ``stack`` closes).
    """
    if not distributed.is_distributed(config) or distributed.is_main_process():
        stack.callback(_preflight_files(config).release)
    if config.mode in ("train", "compare", "domain_shift"):
        train.check_devices(config)


def _launch(config: Config, argv: Sequence[str]) -> int:
    """``--processes N``: checks ``--out`` and finds the data here, then starts the processes.

    The lock of ``--out`` is held for the checks and released before the processes
    start: process 0 takes it (and checks ``--out`` again).
    """
    with _preflight_files(config):
        with warnings.catch_warnings():  # process 0 warns about --no-verify again
            warnings.simplefilter("ignore")
            mnist.load_mnist(
                config.data_dir, download_missing=config.download, verify=config.verify, log=_silent
            )
    found = mnist.find_files(mnist.candidate_dirs(config.data_dir))
    assert found is not None  # load_mnist found them (or downloaded them) there
    data_dir = str(found["train_images"].parent)
    # The paths as expanded here, so that every process uses the same ones.
    extra = ["--out", config.out, "--data-dir", data_dir, "--no-download"]
    return distributed.launch(config, [*argv, *extra])


def _speaks(config: Config) -> bool:
    return not distributed.is_distributed(config) or distributed.is_main_process()


def _silent(message: str) -> None:
    pass


def _any_process_failed(config: Config, failed: bool) -> bool:
    if not distributed.is_distributed(config):
        return failed
    return distributed.any_process(failed)


def _write_error(e: WriteError, config: Config | None) -> str:
    """The line for an output file that could not be written, with what to do."""
    if config is not None and config.mode in ("train", "compare"):
        then = "continue with --resume"
    else:
        then = "run again with --overwrite"
    return (
        f"{e}; the files written before are kept (the last complete checkpoint among them): "
        f"make room or fix the permissions, then {then}"
    )


def _os_error(e: OSError) -> str:
    """An ``OSError`` in one line, naming its file."""
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    reason = e.strerror or str(e)
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _run(config: Config, stack: contextlib.ExitStack) -> None:
    distributed.initialize(config)
    # In a run across processes, a process that fails its checks (or finds no
    # data) stops them all, rather than leaving the others waiting for it.
    error = None
    try:
        _preflight(config, stack)
        datasets = get_datasets(config, log=print if _speaks(config) else _silent)
    except (*REFUSED, OSError) as e:
        error = e
    if _any_process_failed(config, error is not None):
        raise error or ConfigError("another process of the run failed (see its output)")
    if config.mode == "fig1":
        paper.run_fig1(config, datasets=datasets)
    elif config.mode == "lr_sweep":
        paper.run_lr_sweep(config, datasets=datasets)
    elif config.mode == "domain_shift":
        shift.run_domain_shift(config, datasets=datasets)
    elif config.mode == "compare":
        compare.run_compare(config, datasets=datasets)
    else:
        train.train_and_evaluate(config, datasets=datasets)
    distributed.shutdown(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``train_mnist.py`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success; 2 when the run is refused (a bad setting,
      ``--out`` in use or holding earlier results, missing, broken or unreadable
      data, an unusable checkpoint); 1 when it fails (a non-finite loss, an output
      file that cannot be written); with ``--processes``, 128 + N when the launcher
      is stopped by signal N (:func:`mnist_demo.distributed.launch`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = None
    with contextlib.ExitStack() as stack:  # holds the lock of --out until the end
        try:
            config = parse_config(argv, description=DESCRIPTION, epilog=EPILOG)
            if config.processes:
                return _launch(config, argv)
            _run(config, stack)
        except train.NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except WriteError as e:
            print(f"error: {_write_error(e, config)}", file=sys.stderr)
            return 1
        except REFUSED as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"error: {_os_error(e)}", file=sys.stderr)
            return 2
    return 0
