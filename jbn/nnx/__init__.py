"""``jbn.nnx``: batch normalization for Flax NNX.

``BatchNorm`` is a drop-in replacement for ``flax.nnx.BatchNorm`` (the same
constructor, call signature and variables); ``convert`` swaps the batch norms of
an existing model in place (and back); ``freeze_batch_norms``,
``unfreeze_batch_norms``, ``FrozenBatchNorm`` and ``batch_norm_mask`` are for
fine-tuning; ``use_prior`` (prior-weighted statistics) and ``Tent`` (entropy
minimization) adapt a model at test time; ``recalibrate_batch_stats`` recomputes running statistics from data
and ``sync_batch_stats`` merges replicas' running statistics exactly;
``fold_batch_norms`` folds the batch norms into the layers before them, in place.
"""

from .._extras import require

require("flax", "jbn.nnx")

from ._accumulate import commit_batch_stats as commit_batch_stats
from ._accumulate import use_accumulation as use_accumulation
from ._batch_norm import BatchNorm as BatchNorm
from ._convert import convert as convert
from ._fold import fold_batch_norms as fold_batch_norms
from ._freeze import FrozenBatchNorm as FrozenBatchNorm
from ._freeze import batch_norm_mask as batch_norm_mask
from ._freeze import freeze_batch_norms as freeze_batch_norms
from ._freeze import unfreeze_batch_norms as unfreeze_batch_norms
from ._prior import Tent as Tent
from ._prior import use_prior as use_prior
from ._recalibrate import recalibrate_batch_stats as recalibrate_batch_stats
from ._stream import reset_stream as reset_stream
from ._stream import use_stream as use_stream
from ._sync import sync_batch_stats as sync_batch_stats

__all__ = (
    "BatchNorm",
    "FrozenBatchNorm",
    "Tent",
    "batch_norm_mask",
    "commit_batch_stats",
    "convert",
    "fold_batch_norms",
    "freeze_batch_norms",
    "recalibrate_batch_stats",
    "reset_stream",
    "sync_batch_stats",
    "unfreeze_batch_norms",
    "use_accumulation",
    "use_prior",
    "use_stream",
)
