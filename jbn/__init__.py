"""jbn: batch normalization for JAX and Flax, with an analytic backward pass."""

from ._batch_norm import bn_forward as bn_forward
from ._batch_norm import bn_init as bn_init
from ._batch_norm import bn_stats as bn_stats

__version__ = "0.1.0"

__all__ = (
    "bn_forward",
    "bn_init",
    "bn_stats",
)
