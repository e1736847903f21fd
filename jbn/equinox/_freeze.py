"""Frozen batch norm for fine-tuning Equinox models.

:func:`freeze_batch_norms` returns the model with every ``jbn.equinox.BatchNorm``
replaced by a :class:`FrozenBatchNorm` holding the same ``weight``, ``bias`` and
``state_index`` (the same leaves in the same order, so the ``eqx.nn.State`` and
``eqx.tree_serialise_leaves`` checkpoints fit both); :func:`unfreeze_batch_norms`
puts the original layers back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
from jax import lax
from jax.typing import ArrayLike

from ._batch_norm import BatchNorm
from ._forward import is_batch_norm
from ._layer import Layer, Output

# The fields a frozen layer holds as its own (leaves); the others are kept as options.
_OWN = ("weight", "bias", "state_index", "inference")


def _rebuild(layer_type: type, fields: dict[str, Any]) -> Any:
    """A module of ``layer_type`` with these fields, without running its ``__init__``."""
    layer = object.__new__(layer_type)
    for name, value in fields.items():
        object.__setattr__(layer, name, value)
    return layer


class FrozenBatchNorm(Layer):
    """A batch norm that always normalizes with its running statistics and updates nothing.

    Made by :func:`freeze_batch_norms` from a ``jbn.equinox.BatchNorm``, whose
    ``weight``, ``bias`` and ``state_index`` it keeps (the same leaves in the same
    order, and the same state entry), with the layer's settings to rebuild it
    (:func:`unfreeze_batch_norms`). Its output is the layer's in inference mode
    (:func:`jbn.bn_forward` with the running statistics), whatever its
    ``inference`` flag, which ``eqx.nn.inference_mode`` still sets (so that
    unfreezing gives the layer in the model's current mode); the state is
    returned as it came. It needs no named axis.

    Attributes:
      stop_gradient: pass no gradient to ``weight`` and ``bias``.
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    stop_gradient: bool = eqx.field(static=True)
    layer_type: type = eqx.field(static=True)
    options: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(self, layer: BatchNorm, *, stop_gradient: bool = False) -> None:
        """Takes over ``layer``'s parameters, state entry and settings.

        Args:
          layer: a ``jbn.equinox.BatchNorm``.
          stop_gradient: pass no gradient to ``weight`` and ``bias``.
        """
        if type(layer) is not BatchNorm:
            raise TypeError(
                f"FrozenBatchNorm freezes a jbn.equinox.BatchNorm, got {type(layer).__qualname__}"
            )
        self.weight, self.bias = layer.weight, layer.bias
        self.state_index, self.inference = layer.state_index, layer.inference
        self.stop_gradient = stop_gradient
        self.layer_type = type(layer)
        self.options = tuple(
            (f.name, getattr(layer, f.name))
            for f in dataclasses.fields(layer)
            if f.name not in _OWN
        )

    def _fields(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _OWN}, **dict(self.options)}

    def unfrozen(self) -> BatchNorm:
        """The ``jbn.equinox.BatchNorm`` this layer froze, with its current parameters and mode."""
        return _rebuild(self.layer_type, self._fields())

    __call__ = Layer.__call__  # Equinox's batch-norm call, written once for jbn's layers

    def _forward(self, x: ArrayLike, state: eqx.nn.State, inference: Any, mask: Any) -> Output:
        """The layer's output in inference mode, ``state`` unchanged; ``inference``, ``mask`` ignored."""
        del inference, mask
        # A prior would pool the batch's statistics in: frozen means the running ones alone.
        fields = {**self._fields(), "prior": None}
        if self.stop_gradient:
            fields["weight"], fields["bias"] = lax.stop_gradient((self.weight, self.bias))
        y, _ = _rebuild(self.layer_type, fields)(x, state, inference=True)
        return y, state


def freeze_batch_norms(model: Any, *, stop_gradient: bool = False) -> Any:
    """The model with every ``jbn.equinox.BatchNorm`` frozen (a :class:`FrozenBatchNorm`).

    Frozen layers normalize with their running statistics and leave the state
    as it is, in training mode too (``eqx.nn.inference_mode(model, False)``
    still puts dropout in training mode)::

      >>> import equinox as eqx, jax, jax.numpy as jnp, jbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
      >>> frozen = jbn.equinox.freeze_batch_norms(bn)
      >>> run = jax.vmap(frozen, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, new_state = run(jnp.ones((8, 3)), state)
      >>> bool((new_state.get(bn.state_index)["count"] == 0).all())
      True

    The parameters keep their place among the leaves, but the model's tree
    structure changes (a new class): make the optimizer state after freezing
    (``eqx.filter(frozen, eqx.is_inexact_array)``), and use
    :func:`jbn.equinox.batch_norm_mask` to train the batch norms alone or
    everything else. ``eqx.nn.BatchNorm`` layers are not frozen: convert the
    model first (:func:`jbn.equinox.convert`).

    Args:
      model: any pytree holding ``jbn.equinox.BatchNorm`` layers.
      stop_gradient: also pass no gradient to the batch norms' ``weight`` and ``bias``.

    Returns:
      The new model (``model`` is not modified).
    """
    if not isinstance(stop_gradient, bool):
        raise TypeError(f"stop_gradient must be a bool, got {stop_gradient!r}")
    is_leaf = lambda n: is_batch_norm(n) or isinstance(n, FrozenBatchNorm)  # noqa: E731
    leaves = jax.tree.leaves(model, is_leaf=is_leaf)
    for leaf in leaves:
        if isinstance(leaf, eqx.nn.BatchNorm):
            raise TypeError(
                "jbn.equinox.freeze_batch_norms freezes jbn.equinox.BatchNorm layers; model has "
                "an eqx.nn.BatchNorm: convert it first with jbn.equinox.convert(model, state)"
            )
        if isinstance(leaf, BatchNorm) and type(leaf) is not BatchNorm:
            raise TypeError(
                f"jbn.equinox.freeze_batch_norms cannot freeze {type(leaf).__qualname__}, a "
                "subclass of jbn.equinox.BatchNorm: its own behaviour would be lost"
            )
    if not any(isinstance(leaf, BatchNorm) for leaf in leaves):
        frozen = any(isinstance(leaf, FrozenBatchNorm) for leaf in leaves)
        raise ValueError(
            "model holds no jbn.equinox.BatchNorm to freeze"
            + (" (its batch norms are frozen already)" if frozen else "")
        )
    return jax.tree.map(
        lambda n: (
            FrozenBatchNorm(n, stop_gradient=stop_gradient) if isinstance(n, BatchNorm) else n
        ),
        model,
        is_leaf=is_leaf,
    )


def unfreeze_batch_norms(model: Any) -> Any:
    """Undoes :func:`freeze_batch_norms`: every :class:`FrozenBatchNorm` becomes its layer again.

    The layers get back their settings and keep the (possibly fine-tuned)
    ``weight`` and ``bias``, their state entry and the model's current
    ``inference`` flag, so a model in training mode updates its running
    statistics again.

    Args:
      model: any pytree holding :class:`FrozenBatchNorm` layers.

    Returns:
      The new model (``model`` is not modified).
    """
    is_frozen = lambda n: isinstance(n, FrozenBatchNorm)  # noqa: E731
    if not any(is_frozen(leaf) for leaf in jax.tree.leaves(model, is_leaf=is_frozen)):
        raise ValueError("model holds no jbn.equinox.FrozenBatchNorm to unfreeze")
    return jax.tree.map(lambda n: n.unfrozen() if is_frozen(n) else n, model, is_leaf=is_frozen)
