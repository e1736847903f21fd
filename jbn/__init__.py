"""jbn: batch normalization for JAX and Flax, with an analytic backward pass."""

from . import nnx as nnx
from ._batch_norm import bn_forward as bn_forward
from ._batch_norm import bn_init as bn_init
from ._batch_norm import bn_stats as bn_stats
from ._fold import fold_batch_norm as fold_batch_norm
from ._fold import fold_batch_norm_variables as fold_batch_norm_variables
from ._linen import BatchNorm as BatchNorm
from ._recalibrate import recalibrate_batch_stats as recalibrate_batch_stats

__version__ = "0.1.0"

__all__ = (
    "BatchNorm",
    "bn_forward",
    "bn_init",
    "bn_stats",
    "fold_batch_norm",
    "fold_batch_norm_variables",
    "nnx",
    "recalibrate_batch_stats",
)
