"""The configuration of a run, declared once: the command line is generated from it.

Every setting is one field of :class:`Config`, with its default, its help text,
the check its value must pass and whether a resumed run may change it. The flag
of a field is its name with dashes (``batch_size`` -> ``--batch-size``; a few
fields also keep a short alias such as ``--lr``). :func:`build_parser` turns the
fields into an :mod:`argparse` parser and :func:`parse_config` into a checked
:class:`Config`, so the two cannot drift. A bad value raises :class:`ConfigError`
with one line that names the flag, before any data is read or step is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

#: The modes of ``train_mnist.py`` and the help of their flags (``train`` has none).
MODES: dict[str, str] = {
    "train": "",
    "fig1": "reproduce Fig. 1 of the batch-norm paper (sigmoid MLP, 50k steps of 60, "
    "with and without BN): writes fig1.png and fig1.json to --out",
    "lr_sweep": "sweep the SGD learning rate of the Fig. 1 network with and without BN "
    "for a fixed budget: writes lr_sweep.png/.md/.json to --out",
    "domain_shift": "measure the trained model of --out (trained first if there is none) on "
    "shifted test domains: stale, recalibrated and fine-tuned batch norms, batch statistics; "
    "writes domain_shift.json/.md/.png to --out; then streams each domain in test-set order "
    "and sorted by label (stale, batch statistics, best prior, jbn.Stream(), TENT with it): "
    "domain_shift_streams.json/.md/.png",
    "compare": "train the model with jbn, flax's batch norm and none (same seed and data "
    "order) into --out/<norm>; writes compare.json/.md/.png to --out",
}

#: The number of training images of MNIST (the most ``--train-limit`` can keep).
MNIST_TRAIN_IMAGES = 60000

#: The peak learning rate when ``--lr`` is not given, per mode.
DEFAULT_LEARNING_RATE = {"train": 3e-3, "fig1": 0.5}

GROUPS = (
    "model and training",
    "data and output",
    "across processes",
    "--fig1 and --lr-sweep",
    "--domain-shift",
)


class ConfigError(ValueError):
    """A setting has a value it cannot have; the message names the flag."""


# ---------------------------------------------------------------------------
# Checks: each returns None when the value is fine, else what was expected.
# ---------------------------------------------------------------------------


def _positive_int(v: int) -> str | None:
    return None if v > 0 else "a positive integer"


def _nonnegative_int(v: int) -> str | None:
    return None if v >= 0 else "an integer >= 0"


def _positive_float(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "a finite number > 0"


def _nonnegative_float(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "a finite number >= 0"


def _in_range(lo: float, hi: float, *, hi_open: bool = False) -> Callable[[float], str | None]:
    def check(v: float) -> str | None:
        ok = math.isfinite(v) and lo <= v and (v < hi if hi_open else v <= hi)
        return None if ok else f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check


def _positive_floats(v: Sequence[float]) -> str | None:
    ok = len(v) > 0 and all(math.isfinite(x) and x > 0 for x in v)
    return None if ok else "a comma-separated list of finite numbers > 0"


def check_coordinator(v: str) -> str | None:
    """None if ``v`` is ``HOST:PORT`` with a port in [1, 65535], else what was expected."""
    host, _, port = v.rpartition(":")
    ok = bool(host) and port.isdigit() and 0 < int(port) < 65536
    return None if ok else "HOST:PORT with a port in [1, 65535]"


def expand_path(text: str) -> str:
    """A path flag's value with ``~`` and environment variables expanded.

    The command line expands each path flag once, when it is parsed, so that the
    path checked is the path written to (``--out=~/x`` is not expanded by the shell).
    """
    return os.path.expanduser(os.path.expandvars(text))


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def _field(
    default: Any,
    help: str,
    *,
    group: str = GROUPS[0],
    check: Callable[[Any], str | None] | None = None,
    choices: Sequence[str] | None = None,
    parse: Callable[[str], Any] | None = None,
    aliases: Sequence[str] = (),
    resumable: bool = False,
    metavar: str | None = None,
) -> Any:
    """A :class:`Config` field with what the command line and the checks need."""
    meta = dict(
        help=help,
        group=group,
        check=check,
        choices=choices,
        parse=parse,
        aliases=tuple(aliases),
        resumable=resumable,
        metavar=metavar,
    )
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_OUT = GROUPS[1]
_PROCS = GROUPS[2]
_PAPER = GROUPS[3]
_SHIFT = GROUPS[4]


@dataclasses.dataclass
class Config:
    """Every setting of ``train_mnist.py``; the defaults are the default run.

    See ``python train_mnist.py --help`` (generated from the fields' metadata)
    for what each one means. Constructing a Config checks every value and
    raises :class:`ConfigError` naming the flag of the first bad one.
    """

    mode: str = _field("train", "what to run", choices=tuple(MODES), resumable=True)
    model: str = _field("cnn", "network to train", choices=("cnn", "mlp"))
    norm: str = _field(
        "jbn",
        "batch norm implementation: jbn.BatchNorm, flax.linen.BatchNorm, or none",
        choices=("jbn", "flax", "none"),
    )
    epochs: int = _field(5, "passes over the training set", check=_positive_int)
    batch_size: int = _field(
        128,
        "global batch size, split over the devices (must be divisible by their number)",
        check=_positive_int,
    )
    eval_batch_size: int = _field(
        1000, "batch size for evaluation", check=_positive_int, resumable=True
    )
    optimizer: str = _field(
        "adam",
        "optax optimizer (momentum = SGD with Nesterov momentum)",
        choices=("adam", "adamw", "sgd", "momentum"),
    )
    learning_rate: float | None = _field(
        None,
        f"peak learning rate (default {DEFAULT_LEARNING_RATE['train']} for training, "
        f"{DEFAULT_LEARNING_RATE['fig1']} for --fig1)",
        parse=float,
        aliases=("--lr",),
        check=_positive_float,
    )
    schedule: str = _field(
        "cosine",
        "learning-rate schedule (cosine: linear warmup then cosine decay to 0)",
        choices=("cosine", "onecycle", "constant"),
    )
    warmup_epochs: float = _field(
        0.3, "warmup of the cosine schedule, in epochs", check=_nonnegative_float
    )
    momentum: float = _field(
        0.9, "SGD momentum / Adam beta1", check=_in_range(0.0, 1.0, hi_open=True)
    )
    weight_decay: float = _field(1e-4, "weight decay of adamw", check=_nonnegative_float)
    bn_momentum: float = _field(
        0.9, "momentum of the batch-norm running averages", check=_in_range(0.0, 1.0)
    )
    bn_epsilon: float = _field(1e-5, "epsilon of batch norm", check=_positive_float)
    accumulate: int = _field(
        1,
        "gradient accumulation: split each batch into K micro-batches whose gradients are "
        "averaged into one optimizer step (--batch-size stays the optimizer's batch)",
        check=_positive_int,
        metavar="K",
    )
    accumulate_bn: str = _field(
        "commit",
        "with --accumulate K > 1, the batch-norm running statistics: commit (jbn's "
        "accumulation mode: one update per optimizer step, with the whole batch's statistics) "
        "or micro (an update per micro-batch, as without jbn)",
        choices=("commit", "micro"),
    )
    seed: int = _field(0, "seed of initialization and data order", check=_nonnegative_int)
    augment_shift: int = _field(
        2,
        "random shifts of up to N pixels of the training images (0: none)",
        check=lambda v: None if 0 <= v <= 13 else "in [0, 13]",
    )
    train_limit: int = _field(
        0,
        "train on only the first N training images (0: all 60000); for quick tries",
        check=_nonnegative_int,
    )
    devices: int = _field(
        0,
        "shard each batch over the first N devices (0: all visible devices; "
        "e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2 makes 2 CPU devices)",
        check=_nonnegative_int,
        resumable=True,
    )
    data_dir: str | None = _field(
        None,
        "directory with the four MNIST IDX files (.gz or not); when given, the only "
        "place looked at (or downloaded into)",
        group=_OUT,
        parse=expand_path,
        resumable=True,
        metavar="DIR",
    )
    download: bool = _field(
        True,
        "download MNIST from the public mirrors if it is not found, into --data-dir "
        "(else $JBN_DATA_DIR; a clone ships the files in data/mnist)",
        group=_OUT,
        resumable=True,
    )
    verify: bool = _field(
        True,
        "check the SHA-256 of the MNIST files (--no-verify only for small synthetic test "
        "files: a warning is printed and official-size files are always checked)",
        group=_OUT,
        resumable=True,
    )
    out: str = _field(
        "runs/mnist",
        "output directory: checkpoint, metrics.json/.csv, curves.png (and fig1/lr-sweep files); "
        "one run at a time (it holds DIR/.lock while it runs)",
        group=_OUT,
        parse=expand_path,
        resumable=True,
        metavar="DIR",
    )
    resume: bool = _field(
        False, "continue from the checkpoint in --out", group=_OUT, resumable=True
    )
    overwrite: bool = _field(
        False,
        "replace the results of an earlier run in --out (without it, such an --out is refused)",
        group=_OUT,
        resumable=True,
    )
    checkpoint_every: int = _field(
        0,
        "also checkpoint every N steps (0: only at the end of each epoch)",
        group=_OUT,
        check=_nonnegative_int,
        resumable=True,
    )
    progress: bool = _field(True, "show a tqdm progress bar", group=_OUT, resumable=True)
    log_every: int = _field(
        20, "steps between progress-bar updates", group=_OUT, check=_positive_int, resumable=True
    )
    processes: int = _field(
        0,
        "train in N processes started on this machine (localhost, CPU collectives over "
        "gloo), each on its share of every batch, and wait for them (0: in this process)",
        group=_PROCS,
        check=_nonnegative_int,
        resumable=True,
    )
    coordinator: str | None = _field(
        None,
        "HOST:PORT of process 0 (the coordinator) in a run across processes, the same in "
        "every process (default: $JAX_COORDINATOR_ADDRESS)",
        group=_PROCS,
        parse=str,
        check=check_coordinator,
        metavar="HOST:PORT",
        resumable=True,
    )
    num_processes: int = _field(
        0,
        "number of processes of a run across processes (0: one, unless --coordinator or "
        "$JAX_COORDINATOR_ADDRESS is set; then JAX reads it from a cluster's environment)",
        group=_PROCS,
        check=_nonnegative_int,
        resumable=True,
    )
    process_id: int | None = _field(
        None,
        "this process's index in a run across processes, in [0, --num-processes); process 0 "
        "logs and writes the results",
        group=_PROCS,
        parse=int,
        check=_nonnegative_int,
        resumable=True,
    )
    init_std: float = _field(
        0.01,
        "standard deviation of the Gaussian initial weights of the Fig. 1 network",
        group=_PAPER,
        check=_positive_float,
        resumable=True,
    )
    fig1_steps: int = _field(
        50_000, "training steps of --fig1", group=_PAPER, check=_positive_int, resumable=True
    )
    fig1_batch_size: int = _field(
        60,
        "examples per step of --fig1 and --lr-sweep",
        group=_PAPER,
        check=_positive_int,
        resumable=True,
    )
    fig1_unit: int = _field(
        0,
        "the sigmoid of the last hidden layer (of 100) whose input --fig1 tracks",
        group=_PAPER,
        check=lambda v: None if 0 <= v < 100 else "in [0, 99]",
        resumable=True,
    )
    eval_every: int = _field(
        500,
        "steps between test evaluations in --fig1 and --lr-sweep",
        group=_PAPER,
        check=_positive_int,
        resumable=True,
    )
    sweep_lrs: tuple[float, ...] = _field(
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
        "comma-separated learning rates of --lr-sweep",
        group=_PAPER,
        parse=_floats,
        check=_positive_floats,
        resumable=True,
    )
    sweep_steps: int = _field(
        2000,
        "steps per learning rate of --lr-sweep",
        group=_PAPER,
        check=_positive_int,
        resumable=True,
    )

    finetune_examples: int = _field(
        500,
        "labeled images of each shifted domain that bn_finetuned trains the batch norms on",
        group=_SHIFT,
        check=_positive_int,
        resumable=True,
    )
    finetune_steps: int = _field(
        200,
        "steps (of 32 images) of bn_finetuned",
        group=_SHIFT,
        check=_positive_int,
        resumable=True,
    )

    def __post_init__(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE.get(
                self.mode, DEFAULT_LEARNING_RATE["train"]
            )
        self.sweep_lrs = tuple(self.sweep_lrs)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise ConfigError(f"{_label(f)} must be one of {', '.join(choices)}; got {value!r}")
            check = f.metadata["check"]
            if check is not None and value is not None:
                expected = check(value)
                if expected is not None:
                    raise ConfigError(f"{_label(f)} must be {expected}; got {_show(value)}")
        self._check_together()

    def _check_together(self) -> None:
        """Checks of settings that only make sense together."""
        if self.mode == "fig1" and self.fig1_steps % self.eval_every:
            raise ConfigError(
                f"--eval-every {self.eval_every} must divide --fig1-steps {self.fig1_steps} "
                "(the test set is evaluated every --eval-every steps, up to the last)"
            )
        chunk = min(self.eval_every, self.sweep_steps)
        if self.mode == "lr_sweep" and self.sweep_steps % chunk:
            raise ConfigError(
                f"--eval-every {self.eval_every} must divide --sweep-steps {self.sweep_steps} "
                "(the test set is evaluated every --eval-every steps, up to the last)"
            )
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: choose one")
        self._check_batches()
        self._check_processes()
        if self.mode == "domain_shift" and self.norm != "jbn":
            raise ConfigError(
                f"--domain-shift needs --norm jbn, not --norm {self.norm}: "
                + (
                    "it studies a model's batch norms"
                    if self.norm == "none"
                    else "it recalibrates the running statistics with jbn.recalibrate_batch_stats, "
                    "which recalibrates jbn.BatchNorm layers only"
                )
            )
        if self.resume and self.mode not in ("train", "compare"):
            raise ConfigError(
                f"--resume only continues training runs (also of --compare), not {flag(self.mode)}"
            )

    def _check_batches(self) -> None:
        """Checks of the batch sizes against the training images they are drawn from."""
        n = self.train_limit or MNIST_TRAIN_IMAGES
        where = (
            f"--train-limit {self.train_limit}"
            if self.train_limit
            else f"the {MNIST_TRAIN_IMAGES} MNIST training images"
        )
        if self.mode in ("fig1", "lr_sweep"):
            if self.fig1_batch_size > n:
                raise ConfigError(
                    f"--fig1-batch-size {self.fig1_batch_size} is larger than {where}: no full "
                    "batch to train on; use a smaller --fig1-batch-size"
                    + (" or a larger --train-limit" if self.train_limit else "")
                )
        elif self.batch_size > n:
            raise ConfigError(
                f"--batch-size {self.batch_size} is larger than {where}: no full batch to train "
                "on; use a smaller --batch-size"
                + (" or a larger --train-limit" if self.train_limit else "")
            )
        if self.batch_size % self.accumulate:
            raise ConfigError(
                f"--accumulate {self.accumulate} must divide --batch-size {self.batch_size} "
                "(each batch is split into that many micro-batches of equal size)"
            )

    def _check_processes(self) -> None:
        """Checks of the settings of a run across processes."""
        given = [
            flag(name)
            for name, unset in (("coordinator", None), ("num_processes", 0), ("process_id", None))
            if getattr(self, name) != unset
        ]
        if self.processes and given:
            raise ConfigError(
                f"--processes starts its own processes on this machine: leave out {given[0]} "
                "(it is for each process of a run you start yourself)"
            )
        many = self.processes or self.num_processes or given
        if many and self.mode != "train":
            raise ConfigError(
                f"only training runs go across processes, not {flag(self.mode)} "
                "(leave out --processes, --coordinator, --num-processes and --process-id)"
            )
        if many and self.devices:
            raise ConfigError(
                "--devices does not apply to a run across processes: it uses every device of "
                "every process (set how many CPU devices each has with XLA_FLAGS="
                "--xla_force_host_platform_device_count=N)"
            )
        n_proc = self.processes or self.num_processes
        if n_proc and self.batch_size % n_proc:
            name = "--processes" if self.processes else "--num-processes"
            raise ConfigError(
                f"--batch-size {self.batch_size} is not divisible by {name} {n_proc}: each "
                f"process takes an equal share of every batch; use a multiple of {n_proc}"
            )
        if self.num_processes and self.process_id is not None:
            if self.process_id >= self.num_processes:
                raise ConfigError(
                    f"--process-id must be in [0, {self.num_processes}) for --num-processes "
                    f"{self.num_processes}; got {self.process_id}"
                )

    @classmethod
    def resumable_fields(cls) -> frozenset[str]:
        """The settings that may differ between a run and its resumption."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["resumable"])


def default_config() -> Config:
    """Returns the configuration of the default run."""
    return Config()


def flag(name: str) -> str:
    """The command-line flag of a field (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def _label(f: dataclasses.Field) -> str:
    return "/".join((*f.metadata["aliases"], flag(f.name)))


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return repr(value) if isinstance(value, str) else f"{value}"


# ---------------------------------------------------------------------------
# The command line, generated from the fields.
# ---------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.dest == "mode":
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Raises :class:`ConfigError` (one line) instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser(description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    """The command line of :class:`Config`: one flag per field.

    Args:
      description: Shown at the top of ``--help``.
      epilog: Shown at the bottom of ``--help``.
    """
    p = _Parser(description=description, epilog=epilog, formatter_class=_HelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "mode":
            # One flag per mode (--fig1, --lr-sweep), at most one of them.
            modes = p.add_mutually_exclusive_group()
            for mode, help in MODES.items():
                if help:
                    modes.add_argument(
                        flag(mode), dest="mode", action="store_const", const=mode, help=help
                    )
            p.set_defaults(mode=default)
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=meta["help"])
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = meta["parse"] or type(default)
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
            elif isinstance(default, tuple):
                kwargs["metavar"] = "X,Y,..."
            elif kwargs["type"] in (int, float):
                kwargs["metavar"] = "N" if kwargs["type"] is int else "X"
            elif kwargs["type"] is str and meta["choices"] is None:
                kwargs["metavar"] = "DIR"
        groups[meta["group"]].add_argument(flag(f.name), *meta["aliases"], **kwargs)
    return p


def parse_config(argv: Sequence[str] | None = None, **parser_kwargs: str) -> Config:
    """Parses and checks a command line.

    Args:
      argv: The arguments (default: ``sys.argv[1:]``).
      **parser_kwargs: ``description`` and ``epilog`` of :func:`build_parser`.

    Returns:
      The checked configuration.

    Raises:
      ConfigError: On an unknown flag or a bad value (the message names it).
    """
    ns = build_parser(**parser_kwargs).parse_args(argv)
    return Config(**vars(ns))


def check_out_dir(out: str | os.PathLike[str]) -> pathlib.Path:
    """Makes sure ``out`` is a directory this process can write into, creating it if needed.

    Raises:
      ConfigError: If it cannot be created or written into.
    """
    path = pathlib.Path(out)  # expanded when parsed (expand_path), not again
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"--out {out}: not a writable directory ({reason})") from None
    return path
