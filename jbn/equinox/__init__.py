"""``jbn.equinox``: batch normalization for Equinox on the jbn core.

``jbn.equinox.BatchNorm`` is a drop-in replacement for ``eqx.nn.BatchNorm(...,
mode="batch")``: the same constructor and call, an ``eqx.nn.StatefulLayer`` whose
running statistics live in an ``eqx.nn.State``, called on one example under
``jax.vmap(..., axis_name=...)``, ``jax.pmap`` or ``shard_map``. Its math is
:func:`jbn.bn_forward`'s (exact statistics, the analytic backward pass, masks,
renorm, torch's conventions). ``jbn.equinox.convert`` swaps every
``eqx.nn.BatchNorm`` of a model for this one.

This module needs ``equinox`` (``pip install jbn[equinox]``); ``import jbn`` does not.
"""

from .._extras import require

require("equinox", "jbn.equinox")

from ._batch_norm import BatchNorm as BatchNorm
from ._convert import convert as convert

__all__ = ("BatchNorm", "convert")
