"""jbn: batch normalization for JAX, Flax and Equinox, with an analytic backward pass.

The functional core is ``bn_init``, ``bn_forward`` and ``bn_stats``; the
frontends are ``jbn.linen`` (``jbn.BatchNorm`` is ``jbn.linen.BatchNorm``),
``jbn.nnx`` and ``jbn.equinox`` (imported on its own, as equinox is optional).
"""

from importlib.metadata import PackageNotFoundError, version

from . import linen as linen
from . import nnx as nnx
from ._batch_norm import bn_forward as bn_forward
from ._batch_norm import bn_init as bn_init
from ._batch_norm import bn_stats as bn_stats
from ._fold import fold_batch_norm as fold_batch_norm
from ._fold import fold_batch_norm_variables as fold_batch_norm_variables
from ._freeze import optimize_only as optimize_only
from ._recalibrate import recalibrate_batch_stats as recalibrate_batch_stats
from ._sync import sync_batch_stats as sync_batch_stats
from .linen import BatchNorm as BatchNorm

try:
    __version__ = version("jbn")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "unknown"

__all__ = (
    "BatchNorm",
    "bn_forward",
    "bn_init",
    "bn_stats",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "linen",
    "nnx",
    "optimize_only",
    "recalibrate_batch_stats",
    "sync_batch_stats",
)


def __getattr__(name: str):
    # jbn.equinox after a plain `import jbn`, without importing equinox eagerly.
    if name == "equinox":
        import importlib

        return importlib.import_module(".equinox", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
