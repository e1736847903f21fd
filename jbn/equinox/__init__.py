"""``jbn.equinox``: batch normalization for Equinox on the jbn core.

``jbn.equinox.BatchNorm`` is a drop-in replacement for ``eqx.nn.BatchNorm(...,
mode="batch")``: the same constructor and call, an ``eqx.nn.StatefulLayer`` whose
running statistics live in an ``eqx.nn.State``, called on one example under
``jax.vmap(..., axis_name=...)``, ``jax.pmap`` or ``shard_map``. Its math is
:func:`jbn.bn_forward`'s (exact statistics, the analytic backward pass, masks,
renorm, torch's conventions). ``jbn.equinox.convert`` swaps every
``eqx.nn.BatchNorm`` of a model for this one. ``recalibrate_batch_stats``
recomputes the running statistics from data, ``sync_batch_stats`` merges
replicas' states, ``freeze_batch_norms`` / ``unfreeze_batch_norms`` (with
``batch_norm_mask``) are for fine-tuning, ``fold_batch_norms`` folds the batch
norms into the layers before them for serving, and ``use_prior`` (prior-weighted
statistics) and ``Tent`` (entropy minimization on the ``batch_norm_mask``
parameters) adapt a model at test time. ``use_accumulation`` and
``commit_batch_stats`` give gradient accumulation one running update per
optimizer step.

This module needs ``equinox`` (``pip install jbn[equinox]``); ``import jbn`` does not.
"""

from .._extras import require

require("equinox", "jbn.equinox")

from ._accumulate import commit_batch_stats as commit_batch_stats
from ._accumulate import use_accumulation as use_accumulation
from ._batch_norm import BatchNorm as BatchNorm
from ._convert import convert as convert
from ._fold import fold_batch_norms as fold_batch_norms
from ._freeze import FrozenBatchNorm as FrozenBatchNorm
from ._freeze import freeze_batch_norms as freeze_batch_norms
from ._freeze import unfreeze_batch_norms as unfreeze_batch_norms
from ._prior import Tent as Tent
from ._prior import batch_norm_mask as batch_norm_mask
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
