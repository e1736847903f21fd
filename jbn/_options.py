"""jbn's own options, declared once: name, default, annotation, check and help.

:data:`OPTIONS` is the one source of every jbn option. :func:`jbn.bn_forward`
and the frontends (``jbn.linen.BatchNorm``'s fields, ``jbn.nnx.BatchNorm``'s
and ``jbn.equinox.BatchNorm``'s ``__init__``) each spell the option out in
their signature, so type checkers and readers see it, and tests
(``tests/*/test_*options*``) fail when one of them lacks an option, misnames
it, or has another default or annotation. Everything else comes from here:
the checks at construction (:func:`check_all`), the forwarding to
``bn_forward`` (:func:`forward_kwargs`) and the docstrings (:func:`document`).

To add an option: add an :class:`Option` below, a keyword argument of the same
name, default and annotation to ``bn_forward`` and to each frontend, and use it
in the core.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from . import _checks as checks

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Option:
    """One jbn option.

    Attributes:
      name: the argument's name, the same in ``bn_forward`` and every frontend.
      default: its default, the same everywhere.
      annotation: its type as the frontends write it (a string, since jbn uses
        ``from __future__ import annotations``).
      check: ``check(value, name)`` returns the checked value or raises one clear
        error naming the option.
      help: what it does, for the docstrings (one paragraph).
      per_call: a call may override it (``bn(x, rmax=...)``), e.g. from a schedule.
    """

    name: str
    default: Any
    annotation: str
    check: Callable[[Any, str], Any]
    help: str
    per_call: bool = False


OPTIONS: tuple[Option, ...] = (
    Option(
        "unbiased_running_var",
        False,
        "bool",
        checks.python_bool,
        "store the running variance with Bessel's correction n/(n-1), n the number of values "
        "per feature in the batch, while normalizing with the biased batch variance (torch's "
        "convention).",
    ),
    Option(
        "finite_running_stats",
        True,
        "bool",
        checks.python_bool,
        "True (default): a feature whose batch statistics are not finite (a NaN or inf in the "
        "batch) keeps its running statistics (and its count); False: update them anyway, as "
        "flax does.",
    ),
    Option(
        "residual",
        "input",
        "Residual",
        checks.residual,
        'what the backward pass keeps: "input" (x) or "output" (y, the In-Place Activated '
        'BatchNorm trick: free when the next layer keeps y anyway). With "output", x̂ is '
        "rebuilt as (y - β)/γ, so the forward pass uses ±min_scale where |γ| < min_scale.",
    ),
    Option(
        "min_scale",
        1e-3,
        "float",
        checks.positive_float,
        'smallest |γ| used with residual="output", a finite number > 0 (default 1e-3).',
    ),
    Option(
        "virtual_batch_size",
        None,
        "int | None",
        checks.positive_int,
        "ghost batch norm (Hoffer et al. 2017): in training, normalize each group of this many "
        "examples with its own statistics; the running statistics follow the groups' "
        "count-weighted means. Must divide the batch.",
    ),
    Option(
        "renorm",
        False,
        "bool",
        checks.python_bool,
        "batch renormalization (Ioffe 2017) in training: y = γ((x - μ_B)/σ_B · r + d) + β with "
        "r = clip(σ_B/σ, 1/rmax, rmax) and d = clip((μ_B - μ)/σ, -dmax, dmax) from the running "
        "statistics before the update, held constant for differentiation.",
    ),
    Option(
        "rmax",
        3.0,
        "float",
        checks.rmax,
        "renorm's bound on r, >= 1 (default 3.0; inf: no bound). A call may override it, e.g. "
        "with a schedule (a scalar array under jit).",
        per_call=True,
    ),
    Option(
        "dmax",
        5.0,
        "float",
        checks.dmax,
        "renorm's bound on |d|, >= 0 (default 5.0); overridable per call like rmax.",
        per_call=True,
    ),
    Option(
        "prior",
        None,
        "float | None",
        checks.prior_option,
        "test-time adaptation (Schneider et al. 2020): None (default) or N >= 0 (inf allowed), "
        "which makes every call, in training or evaluation mode, normalize with the running "
        "statistics counted as N examples pooled with the batch's n examples, and update "
        "nothing (an example is a slice along axis 0 when it is reduced, else the whole local "
        "array; n = counted values per feature / values per example, so masks and partial "
        "examples count). With w = N/(N + n), the pooled form is μ = w μ_run + (1 - w) μ_B, "
        "σ² = w σ²_run + (1 - w) σ²_B + w (1 - w)(μ_run - μ_B)² (Chan's formula). N = 0 is "
        "the batch statistics, inf the running ones. Masks and axis_name work as in training "
        "(the whole synchronized batch's statistics), and batches of one example work (N > 0). "
        "The gradient flows through the batch's share (TENT needs it).",
    ),
    Option(
        "prior_form",
        "pooled",
        "PriorForm",
        checks.prior_form,
        'how prior weighs the two groups: "pooled" (default: their exact pooled statistics) or '
        '"linear" (the paper\'s mix, without the between-groups term w (1 - w)(μ_run - μ_B)²).',
    ),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}

# jbn's own settings, with their defaults (the same in every frontend).
JBN: dict[str, Any] = {o.name: o.default for o in OPTIONS}

# flax's BatchNorm settings that bn_forward takes under the same name.
FLAX = ("axis", "momentum", "epsilon", "axis_name", "axis_index_groups")

# Settings a call may override (renorm's bounds, e.g. from a schedule).
PER_CALL: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.per_call)


def check_all(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every jbn option in ``values`` checked by its declared check (others are kept)."""
    return {k: BY_NAME[k].check(v, k) if k in BY_NAME else v for k, v in values.items()}


def check_module(module: Any) -> None:
    """Checks the jbn options stored as ``module``'s attributes (at construction)."""
    check_all({name: getattr(module, name) for name in JBN})


def jbn_kwargs(module: Any, **per_call: Any) -> dict[str, Any]:
    """jbn's options from ``module``'s attributes, with this call's overrides.

    Args:
      module: any object with the attributes named in ``JBN``.
      **per_call: values given to this call (``rmax``, ``dmax``); None means
        "use the attribute".
    """
    kwargs = {name: getattr(module, name) for name in JBN}
    for name, value in per_call.items():
        if name not in PER_CALL:
            raise TypeError(f"{name} cannot be set per call; set it on the module")
        if value is not None:
            kwargs[name] = BY_NAME[name].check(value, name)
    return kwargs


def forward_kwargs(module: Any, **per_call: Any) -> dict[str, Any]:
    """``bn_forward``'s keyword arguments from ``module``'s flax and jbn attributes.

    Args:
      module: any object with the attributes named in ``FLAX`` and ``JBN``.
      **per_call: values given to this call (``rmax``, ``dmax``); None means
        "use the attribute".
    """
    return {**{name: getattr(module, name) for name in FLAX}, **jbn_kwargs(module, **per_call)}


def help_text(indent: str, width: int = 88) -> str:
    """The ``name: help`` entries of every option, as lines of an ``Args:`` section."""
    lines = []
    for o in OPTIONS:
        lines += textwrap.wrap(
            f"{o.name}: {o.help}", width, initial_indent=indent, subsequent_indent=indent + "  "
        )
    return "\n".join(lines)


MARKER = "<jbn options>"


def document(obj: T) -> T:
    """Replaces the line ``<jbn options>`` of ``obj``'s docstring with :func:`help_text`."""
    doc = obj.__doc__
    if doc is None or MARKER not in doc:
        raise ValueError(f"{obj!r}'s docstring has no {MARKER} line")
    lines = doc.split("\n")
    for i, line in enumerate(lines):
        if line.strip() == MARKER:
            lines[i] = help_text(line[: len(line) - len(line.lstrip())])
    obj.__doc__ = "\n".join(lines)
    return obj
