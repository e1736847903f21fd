"""``jbn.equinox``: batch normalization for Equinox on the jbn core.

``jbn.equinox.BatchNorm`` is a drop-in replacement for ``eqx.nn.BatchNorm(...,
mode="batch")``: the same constructor and call, an ``eqx.nn.StatefulLayer`` whose
running statistics live in an ``eqx.nn.State``, called on one example under
``jax.vmap(..., axis_name=...)``, ``jax.pmap`` or ``shard_map``. Its math is
:func:`jbn.bn_forward`'s (exact statistics, the analytic backward pass, masks,
renorm, torch's conventions). ``jbn.equinox.convert`` swaps every
``eqx.nn.BatchNorm`` of a model for this one. ``use_prior`` (prior-weighted statistics) and ``Tent``
(entropy minimization on the ``batch_norm_mask`` parameters) adapt a model at
test time.

This module needs ``equinox`` (``pip install jbn[equinox]``); ``import jbn`` does not.
"""

from .._extras import require

require("equinox", "jbn.equinox")

from ._batch_norm import BatchNorm as BatchNorm
from ._convert import convert as convert
from ._prior import Tent as Tent
from ._prior import batch_norm_mask as batch_norm_mask
from ._prior import use_prior as use_prior
from ._stream import reset_stream as reset_stream
from ._stream import use_stream as use_stream

__all__ = (
    "BatchNorm",
    "Tent",
    "batch_norm_mask",
    "convert",
    "reset_stream",
    "use_prior",
    "use_stream",
)
