"""The command line of ``train_mnist.py``: parse and check, then run one mode.

Every value is checked before any data is read or any step is trained; each
failure prints one line starting with ``error:`` and returns a nonzero status.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from . import compare, distributed, mnist, paper, shift, train
from .checkpoints import CheckpointError
from .config import Config, ConfigError, check_out_dir, parse_config
from .data import get_datasets
from .files import remove_stale_tmp
from .mnist import MNISTError

DESCRIPTION = (
    "MNIST with batch normalization (jbn), and the batch-norm paper's Fig. 1. "
    "Trains a CNN with jbn.BatchNorm by default."
)
EPILOG = (
    "MNIST (the four IDX files, .gz or not) is read from --data-dir when it is given, "
    "and from nowhere else; otherwise it is looked for in $JBN_DATA_DIR, then in "
    "~/.cache/jbn/mnist. If it is not there, it is downloaded (unless --no-download) "
    "into that directory (the first of the two), and every file is checked against the "
    "SHA-256 of the official uncompressed file."
)


def _preflight_files(config: Config) -> None:
    """The checks of ``--out``, before any data is read."""
    out = check_out_dir(config.out)
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
        if config.mode == "domain_shift" and config.norm == "none":
            raise ConfigError("--domain-shift needs a model with batch norm, not --norm none")


def _preflight(config: Config) -> None:
    """The checks that need the file system or the devices, before any data is read.

    In a run across processes, process 0 alone checks (and creates) ``--out``.
    """
    if not distributed.is_distributed(config) or distributed.is_main_process():
        _preflight_files(config)
    if config.mode in ("train", "compare", "domain_shift"):
        train.check_devices(config)


def _launch(config: Config, argv: Sequence[str]) -> int:
    """``--processes N``: checks ``--out`` and finds the data here, then starts the processes."""
    _preflight_files(config)
    with warnings.catch_warnings():  # process 0 warns about --no-verify again
        warnings.simplefilter("ignore")
        mnist.load_mnist(
            config.data_dir, download_missing=config.download, verify=config.verify, log=_silent
        )
    found = mnist.find_files(mnist.candidate_dirs(config.data_dir))
    assert found is not None  # load_mnist found them (or downloaded them) there
    data_dir = str(found["train_images"].parent)
    return distributed.launch(config, [*argv, "--data-dir", data_dir, "--no-download"])


def _speaks(config: Config) -> bool:
    return not distributed.is_distributed(config) or distributed.is_main_process()


def _silent(message: str) -> None:
    pass


def _any_process_failed(config: Config, failed: bool) -> bool:
    if not distributed.is_distributed(config):
        return failed
    return distributed.any_process(failed)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``train_mnist.py`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 2 for a bad setting, missing or broken data
      or an unusable checkpoint, 1 when training diverged (a non-finite loss).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = parse_config(argv, description=DESCRIPTION, epilog=EPILOG)
        if config.processes:
            return _launch(config, argv)
        distributed.initialize(config)
        # In a run across processes, a process that fails its checks (or finds no
        # data) stops them all, rather than leaving the others waiting for it.
        error = None
        try:
            _preflight(config)
            datasets = get_datasets(config, log=print if _speaks(config) else _silent)
        except (ConfigError, FileExistsError, MNISTError, ValueError) as e:
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
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, FileExistsError, MNISTError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
