"""The call of every jbn Equinox layer: Equinox's batch-norm signature, written once."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
from jax.typing import ArrayLike

Output = tuple[jax.Array, eqx.nn.State]


class Layer(eqx.nn.StatefulLayer):
    """A layer called as ``eqx.nn.BatchNorm`` is: ``layer(x, state, *, key, inference, mask)``.

    :class:`jbn.equinox.BatchNorm`, :class:`jbn.equinox.FrozenBatchNorm` and the
    recalibration's wrapper share this call; each writes its ``_forward``.
    """

    def __call__(
        self,
        x: ArrayLike,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: ArrayLike | None = None,
    ) -> Output:
        """Normalizes one example.

        Args:
          x: one example, shape ``(input_size, *spatial)``, floating point.
          state: the ``eqx.nn.State`` holding the running statistics.
          key: ignored (Equinox's layer signature).
          inference: overrides the layer's ``inference`` when not None (a frozen
            layer ignores it).
          mask: optional boolean array broadcastable to ``x``; False entries (e.g. a
            padding example: ``mask=False``) are left out of the statistics, the
            running update and the statistics' gradient.

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape and dtype, and the state with the
          updated running statistics (unchanged in inference and when frozen).

        Raises:
          NameError: in training, when a name of ``axis_name`` is not bound by an
            enclosing vmap, pmap or shard_map.
        """
        del key
        return self._forward(x, state, inference, mask)

    @abc.abstractmethod
    def _forward(self, x: ArrayLike, state: eqx.nn.State, inference: Any, mask: Any) -> Output:
        """The call, ``key`` aside: ``inference`` and ``mask`` as given (None where not)."""
