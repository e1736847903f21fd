"""``jbn.linen``: batch normalization for Flax linen.

``BatchNorm`` is a drop-in replacement for ``flax.linen.BatchNorm``
(``jbn.BatchNorm`` is the same class); ``intercept()`` runs every
``flax.linen.BatchNorm`` of any model through jbn without editing it;
``frozen_batch_norms()`` and ``batch_norm_mask`` are for fine-tuning;
``recalibrate_batch_stats`` recomputes running statistics from data and
``sync_batch_stats`` merges replicas' running statistics exactly;
``fold_batch_norms`` folds the batch norms into the layers before them.
"""

from .._extras import require

require("flax", "jbn.linen")

from .._sync import sync_batch_stats as sync_batch_stats
from ._accumulate import commit_batch_stats as commit_batch_stats
from ._accumulate import start_accumulation as start_accumulation
from ._accumulate import use_accumulation as use_accumulation
from ._batch_norm import BatchNorm as BatchNorm
from ._calls import InterceptWarning as InterceptWarning
from ._fold import fold_batch_norms as fold_batch_norms
from ._freeze import batch_norm_mask as batch_norm_mask
from ._freeze import frozen_batch_norms as frozen_batch_norms
from ._intercept import intercept as intercept
from ._prior import Tent as Tent
from ._prior import use_prior as use_prior
from ._recalibrate import recalibrate_batch_stats as recalibrate_batch_stats
from ._stream import reset_stream as reset_stream
from ._stream import start_stream as start_stream
from ._stream import use_stream as use_stream

__all__ = (
    "BatchNorm",
    "InterceptWarning",
    "Tent",
    "batch_norm_mask",
    "commit_batch_stats",
    "fold_batch_norms",
    "frozen_batch_norms",
    "intercept",
    "recalibrate_batch_stats",
    "reset_stream",
    "start_accumulation",
    "start_stream",
    "sync_batch_stats",
    "use_accumulation",
    "use_prior",
    "use_stream",
)
