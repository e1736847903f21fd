"""The command line of ``train_mnist.py``: parse and check, then run one mode.

Every value is checked before any data is read or any step is trained; each
failure prints one line starting with ``error:`` and returns a nonzero status.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import compare, paper, shift, train
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


def _preflight(config: Config) -> None:
    """The checks that need the file system or the devices, before any data is read."""
    out = check_out_dir(config.out)
    names = train.RESULT_FILES + paper.FIG1_FILES + paper.LR_SWEEP_FILES
    names += shift.DOMAIN_SHIFT_FILES + compare.COMPARE_FILES
    for tmp in remove_stale_tmp(out, list(names)):
        print(f"removed {tmp}, left over from an interrupted write")
    if config.mode == "train":
        if not (config.resume or config.overwrite):
            train.check_fresh_out(out, train.RESULT_FILES, resumable=True)
        train.check_devices(config)
    elif config.mode == "compare":
        if not (config.resume or config.overwrite):
            train.check_fresh_out(out, compare.COMPARE_FILES, resumable=True)
        train.check_devices(config)
    elif not config.overwrite:
        files = {
            "fig1": paper.FIG1_FILES,
            "lr_sweep": paper.LR_SWEEP_FILES,
            "domain_shift": shift.DOMAIN_SHIFT_FILES,
        }[config.mode]
        train.check_fresh_out(out, files, resumable=False)
        if config.mode == "domain_shift":
            if config.norm == "none":
                raise ConfigError("--domain-shift needs a model with batch norm, not --norm none")
            train.check_devices(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``train_mnist.py`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 2 for a bad setting, missing or broken data
      or an unusable checkpoint, 1 when training diverged (a non-finite loss).
    """
    try:
        config = parse_config(argv, description=DESCRIPTION, epilog=EPILOG)
        _preflight(config)
        datasets = get_datasets(config)
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
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, FileExistsError, MNISTError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
