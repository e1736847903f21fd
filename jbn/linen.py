"""``jbn.linen``: batch normalization for Flax linen.

``BatchNorm`` is a drop-in replacement for ``flax.linen.BatchNorm``
(``jbn.BatchNorm`` is the same class), and ``recalibrate_batch_stats``
recomputes the running statistics of a model's jbn batch norms from data.
"""

from ._linen import BatchNorm as BatchNorm
from ._recalibrate import recalibrate_batch_stats as recalibrate_batch_stats
from ._sync import sync_batch_stats as sync_batch_stats

__all__ = ("BatchNorm", "recalibrate_batch_stats", "sync_batch_stats")
