"""``jbn.nnx``: batch normalization for Flax NNX.

``BatchNorm`` is a drop-in replacement for ``flax.nnx.BatchNorm`` (the same
constructor, call signature and variables), and ``recalibrate_batch_stats``
recomputes the running statistics of a model's jbn batch norms from data;
``sync_batch_stats`` merges replicas' running statistics exactly.
"""

from ._nnx import BatchNorm as BatchNorm
from ._recalibrate import recalibrate_nnx_batch_stats as recalibrate_batch_stats
from ._sync import sync_nnx_batch_stats as sync_batch_stats

__all__ = ("BatchNorm", "recalibrate_batch_stats", "sync_batch_stats")
