"""jbn: batch normalization for JAX, Flax and Equinox, with an analytic backward pass.

The functional core is ``bn_init``, ``bn_forward`` and ``bn_stats``; it needs
jax alone. The frontends are subpackages loaded on first use: ``jbn.linen``
(``jbn.BatchNorm`` is ``jbn.linen.BatchNorm``) and ``jbn.nnx`` need flax
(``pip install "jbn[flax]"``), ``jbn.equinox`` needs equinox
(``pip install "jbn[equinox]"``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ._accumulate import Accumulate as Accumulate
from ._accumulate import bn_commit as bn_commit
from ._accumulate import start_accumulation as start_accumulation
from ._batch_norm import bn_forward as bn_forward
from ._batch_norm import bn_init as bn_init
from ._batch_norm import bn_stats as bn_stats
from ._fold import fold_batch_norm as fold_batch_norm
from ._fold import fold_batch_norm_variables as fold_batch_norm_variables
from ._fold_trace import FoldReport as FoldReport
from ._optimize import optimize_only as optimize_only
from ._prior import Prior as Prior
from ._stream import Stream as Stream
from ._stream import reset_stream as reset_stream
from ._stream import start_stream as start_stream
from ._sync import sync_batch_stats as sync_batch_stats

if TYPE_CHECKING:
    from . import equinox as equinox
    from . import linen as linen
    from . import nnx as nnx
    from .linen import BatchNorm as BatchNorm
    from .linen import recalibrate_batch_stats as recalibrate_batch_stats

try:
    __version__ = version("jbn")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "unknown"

# The core, which needs jax alone, so `from jbn import *` works without any framework.
__all__ = (
    "Accumulate",
    "FoldReport",
    "Prior",
    "Stream",
    "bn_commit",
    "bn_forward",
    "bn_init",
    "bn_stats",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "optimize_only",
    "reset_stream",
    "start_stream",
    "start_accumulation",
    "sync_batch_stats",
)

# Names that load a frontend on first use (PEP 562): `jbn.linen`, `jbn.nnx`,
# `jbn.equinox`, and linen's `jbn.BatchNorm` and `jbn.recalibrate_batch_stats`.
_SUBPACKAGES = ("linen", "nnx", "equinox")
_FROM_LINEN = ("BatchNorm", "recalibrate_batch_stats")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _FROM_LINEN:
        return getattr(importlib.import_module(".linen", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES, *_FROM_LINEN})
