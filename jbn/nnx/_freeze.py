"""Frozen batch norm for fine-tuning NNX models, and the optax mask of their batch norms.

:func:`freeze_batch_norms` swaps every ``flax.nnx.BatchNorm`` and
``jbn.nnx.BatchNorm`` for a :class:`FrozenBatchNorm` holding the same variables
(same paths), which ``model.train()`` leaves frozen; :func:`unfreeze_batch_norms`
swaps them back; :func:`batch_norm_mask` gives a bool pytree over the model's
parameters, True on the batch-norm ones, for :func:`jbn.optimize_only`.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
from flax import nnx
from flax.nnx import graph

from .. import _checks as checks
from .._batch_norm import bn_forward
from ._batch_norm import BatchNorm as JbnNnxBatchNorm
from ._graph import replace_modules


class FrozenBatchNorm(nnx.Module):
    """A batch norm that always normalizes with its running statistics and updates nothing.

    Built by :func:`freeze_batch_norms` from a ``flax.nnx.BatchNorm`` or
    ``jbn.nnx.BatchNorm``, whose variables it keeps under the same names
    (``mean``, ``var``, ``scale``, ``bias``; ``count`` for a cumulative jbn layer),
    so state paths, checkpoints and optimizer masks are unchanged. It has no
    ``use_running_average`` attribute, so ``model.train()`` leaves it frozen, and
    it ignores a ``use_running_average`` or ``mask`` given to the call.

    Attributes:
      stop_gradient: no gradient to ``scale`` and ``bias``.
    """

    # The layer's variables, under the same names (set in __init__).
    mean: nnx.BatchStat[jax.Array]
    var: nnx.BatchStat[jax.Array]
    scale: nnx.Param[jax.Array] | None
    bias: nnx.Param[jax.Array] | None
    count: nnx.BatchStat[jax.Array] | None

    def __init__(
        self, layer: nnx.BatchNorm | JbnNnxBatchNorm, *, stop_gradient: bool = False
    ) -> None:
        """Takes over ``layer``'s variables.

        Args:
          layer: a ``flax.nnx.BatchNorm`` or ``jbn.nnx.BatchNorm``.
          stop_gradient: pass no gradient to ``scale`` and ``bias``.
        """
        for name in ("mean", "var", "scale", "bias", "count"):
            value = getattr(layer, name, None)
            setattr(self, name, nnx.data(None) if value is None else value)
        # Everything needed to build the layer again (unfreeze_batch_norms).
        self.layer_type = type(layer)
        self.layer_options = tuple(
            (k, v) for k, v in vars(layer).items() if k not in _VARIABLES and k not in _INTERNAL
        )
        self.axis = layer.axis
        self.epsilon = layer.epsilon
        self.dtype = layer.dtype
        self.promote_dtype = layer.promote_dtype
        self.stop_gradient = stop_gradient

    def __call__(
        self, x: jax.typing.ArrayLike, use_running_average: Any = None, **_: Any
    ) -> jax.Array:
        """Normalizes ``x`` with the running statistics.

        Args:
          x: input, e.g. (N, C) or (N, H, W, C).
          use_running_average: ignored: the layer is frozen.
          **_: ignored (``mask``: the running statistics need none).

        Returns:
          The normalized ``x``, same shape.
        """
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        if self.stop_gradient:
            scale, bias = jax.lax.stop_gradient((scale, bias))
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        y, _ = bn_forward(
            params, {"mean": mean, "var": var}, x, False, axis=self.axis, epsilon=self.epsilon
        )
        return y


_VARIABLES = ("mean", "var", "scale", "bias", "count", "recalibration")
_INTERNAL = ("_pytree__nodes", "_pytree__state")


_KINDS = "flax.nnx.BatchNorm, jbn.nnx.BatchNorm and jbn.nnx.FrozenBatchNorm layers"


def _batch_norm_types() -> tuple[type, ...]:
    return (nnx.BatchNorm, JbnNnxBatchNorm)


def freeze_batch_norms(model: Any, *, stop_gradient: bool = False) -> Any:
    """Freezes, in place, every ``flax.nnx.BatchNorm`` and ``jbn.nnx.BatchNorm`` of a model.

    Each becomes a :class:`FrozenBatchNorm` with the same variables: normalized
    with the running statistics, nothing updated, even after ``model.train()``
    (which still puts dropout in training mode)::

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jbn.nnx import freeze_batch_norms
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model = freeze_batch_norms(model)
      >>> model.train()
      >>> y = model(jnp.ones((8, 3)))
      >>> bool((model.layers[1].mean[...] == 0).all())
      True

    Args:
      model: an NNX module (or a list, dict or tuple of them).
      stop_gradient: also pass no gradient to ``scale`` and ``bias`` (mask them out
        of the optimizer as well if it has weight decay: :func:`batch_norm_mask`).

    Returns:
      ``model``, changed in place (the new layer if ``model`` is itself a batch norm).
    """
    if not isinstance(stop_gradient, bool):
        raise TypeError(f"stop_gradient must be a bool, got {stop_gradient!r}")
    types = _batch_norm_types()

    def check(layer: nnx.Module) -> None:
        if type(layer) not in types:
            raise TypeError(
                f"freeze_batch_norms cannot freeze {type(layer).__qualname__}, a subclass of "
                f"{', '.join(t.__module__ + '.' + t.__qualname__ for t in types)}: its own "
                "behaviour would be lost"
            )
        recalibrating = getattr(layer, "recalibration", None) is not None
        if recalibrating:
            raise ValueError("freeze_batch_norms: a layer is being recalibrated")

    nodes = [node for _, node in [((), model), *graph.iter_graph(model)]]
    checks.found_batch_norms(
        sum(isinstance(n, (*types, FrozenBatchNorm)) for n in nodes),
        "jbn.nnx.freeze_batch_norms",
        _KINDS,
    )
    for node in nodes:
        if isinstance(node, types):
            check(node)
    return replace_modules(
        model,
        lambda m: isinstance(m, types),
        lambda m: FrozenBatchNorm(m, stop_gradient=stop_gradient),
    )


def unfreeze_batch_norms(model: Any) -> Any:
    """Undoes :func:`freeze_batch_norms`: each frozen layer becomes its original class again.

    The layers get back their options and train/eval state and keep the (possibly
    fine-tuned) variables.

    Args:
      model: an NNX module (or a list, dict or tuple of them).

    Returns:
      ``model``, changed in place (the new layer if ``model`` is itself frozen).
    """

    types = (*_batch_norm_types(), FrozenBatchNorm)
    checks.found_batch_norms(
        sum(isinstance(n, types) for _, n in [((), model), *graph.iter_graph(model)]),
        "jbn.nnx.unfreeze_batch_norms",
        _KINDS,
    )

    def make(frozen: FrozenBatchNorm) -> nnx.Module:
        options = dict(frozen.layer_options)
        constructor = {k: v for k, v in options.items() if k not in ("recalibration",)}
        # num_features first; the remaining options are keyword arguments of both classes.
        layer = frozen.layer_type(
            constructor.pop("num_features"),
            **{k: v for k, v in constructor.items() if k in _constructor_args(frozen.layer_type)},
            rngs=nnx.Rngs(0),
        )
        for name in ("mean", "var", "scale", "bias", "count"):
            if hasattr(layer, name):
                setattr(layer, name, getattr(frozen, name))
        for name, value in options.items():
            setattr(layer, name, value)
        return layer

    return replace_modules(model, lambda m: isinstance(m, FrozenBatchNorm), make)


def _constructor_args(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


def batch_norm_mask(model: nnx.Module, wrt: Any = nnx.Param) -> Any:
    """A bool pytree over the model's ``wrt`` state: True on the batch-norm parameters.

    The structure is that of ``nnx.as_pure(nnx.state(model, wrt))``, the tree
    ``nnx.Optimizer(model, tx, wrt=wrt)`` hands to optax, so the mask works with
    :func:`jbn.optimize_only`, ``optax.masked`` and ``optax.multi_transform``.
    Batch-norm layers are ``flax.nnx.BatchNorm``, ``jbn.nnx.BatchNorm`` and
    :class:`FrozenBatchNorm`.

    Args:
      model: an NNX module.
      wrt: the nnx filter of the optimized variables (default ``nnx.Param``).

    Returns:
      An ``nnx.State`` of Python bools.
    """
    types = (*_batch_norm_types(), FrozenBatchNorm)
    layers = {path for path, m in nnx.iter_modules(model) if isinstance(m, types)}
    checks.found_batch_norms(
        len(layers),
        "jbn.nnx.batch_norm_mask",
        "flax.nnx.BatchNorm, jbn.nnx.BatchNorm and jbn.nnx.FrozenBatchNorm layers",
    )
    state = nnx.state(model, wrt)
    flat = nnx.to_flat_state(state)
    mask = [(path, path[:-1] in layers) for path, _ in flat]
    return nnx.as_pure(nnx.from_flat_state(mask))
