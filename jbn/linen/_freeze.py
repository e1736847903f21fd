"""Frozen batch norm for fine-tuning linen models, and the optax mask of their batch norms.

A pretrained network's running statistics describe the data it was trained on;
when fine-tuning on little data it often pays to keep them (torchvision's
``FrozenBatchNorm2d``, timm's ``freeze_batch_norm_2d``, Keras's
``trainable=False``): each batch norm normalizes with its running statistics,
updates nothing, and optionally passes no gradient to its scale and bias.

:func:`frozen_batch_norms` is a context manager (and decorator) under which
every ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` is frozen, whatever
``use_running_average`` the model passes (so dropout can stay in training mode);
:func:`batch_norm_mask` gives a bool pytree, True on the batch-norm parameters,
for :func:`jbn.optimize_only`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax.linen import dtypes as linen_dtypes

from .. import _tree as tree
from .._batch_norm import bn_forward
from ._calls import Call, intercepting, interceptor, never_reaches_base


class _State(threading.local):
    def __init__(self) -> None:
        self.stop_gradient: list[bool] = []  # one entry per active frozen_batch_norms()


_state = _State()


def _frozen_forward(module: nn.Module, x: Any, stop_gradient: bool) -> jax.Array:
    """The module's evaluation-mode output from its own variables, with jbn's core."""
    params = {
        name: module.get_variable("params", name)
        for name, used in (("scale", module.use_scale), ("bias", module.use_bias))
        if used
    }
    if stop_gradient:
        params = jax.lax.stop_gradient(params)
    state = {name: module.get_variable("batch_stats", name) for name in ("mean", "var")}
    x = jax.numpy.asarray(x)
    dtype = linen_dtypes.canonicalize_dtype(x, *params.values(), dtype=module.dtype)
    y, _ = bn_forward(
        params, state, x, False, axis=module.axis, epsilon=module.epsilon, dtype=dtype
    )
    return y


def _frozen(module: Any, call: Call) -> Any:
    if module.is_initializing() or not module.has_variable("batch_stats", "mean"):
        return call.run()  # creates the variables; init updates nothing
    return _frozen_forward(module, call.x, _state.stop_gradient[-1])


_freezing_interceptor = interceptor(
    _frozen,
    active=lambda: bool(_state.stop_gradient),
    error=never_reaches_base("jbn's frozen_batch_norms cannot freeze"),
)


@contextlib.contextmanager
def frozen_batch_norms(*, stop_gradient: bool = False) -> Iterator[None]:
    """Freezes every linen batch norm (flax's and jbn's) while the context is active.

    Each ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` normalizes with its running
    statistics ``batch_stats/mean`` and ``batch_stats/var`` and updates nothing,
    whatever ``use_running_average`` the model gives it, so a model whose one
    ``train`` flag drives both dropout and batch norm can fine-tune with dropout
    on and batch norm frozen::

      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jbn.linen import frozen_batch_norms
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> with frozen_batch_norms():
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> bool((updates["batch_stats"]["layers_1"]["mean"] == 0).all())
      True

    Like :func:`jbn.linen.intercept`, it works as a decorator too, and a
    function jitted outside it is traced anew inside it (the context is part of
    jit's cache key). A model that runs no batch norm inside it raises a
    ``ValueError`` on exit. ``init`` is left as
    it is (it creates the variables and updates nothing). The output is that of
    evaluation mode, computed with :func:`jbn.bn_forward`.

    Args:
      stop_gradient: also pass no gradient to ``scale`` and ``bias``. Their
        gradient is then zero, but an optimizer with weight decay still moves
        them: mask them out of the optimizer too (:func:`batch_norm_mask`).

    Yields:
      None.
    """
    if not isinstance(stop_gradient, bool):
        raise TypeError(f"stop_gradient must be a bool, got {stop_gradient!r}")
    _state.stop_gradient.append(stop_gradient)
    try:
        with intercepting(_freezing_interceptor, "jbn.linen.frozen_batch_norms", (stop_gradient,)):
            yield
    finally:
        _state.stop_gradient.pop()


def batch_norm_mask(variables: Mapping[str, Any]) -> Any:
    """A bool pytree over ``variables["params"]``: True on the batch-norm parameters.

    A batch-norm layer is recognised from the variables alone, as a module path
    whose ``batch_stats`` hold ``mean`` and ``var`` (what ``flax.linen.BatchNorm``
    and ``jbn.BatchNorm`` create, also under :func:`jbn.linen.intercept`); its
    ``scale`` and ``bias`` at the same path in ``params`` are True, every other
    leaf False. Use it with :func:`jbn.optimize_only`, ``optax.masked`` or
    ``optax.multi_transform``.

    Args:
      variables: a linen variables dict with ``"params"`` and ``"batch_stats"``.

    Returns:
      A pytree of Python bools with the structure of ``variables["params"]``.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "variables must be a linen variables dict with 'params' and 'batch_stats' "
            f"(what model.init returns), got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    if "batch_stats" not in variables:
        raise ValueError(
            "variables has no 'batch_stats' collection: batch-norm layers are found by "
            "their running statistics, so pass the whole variables dict (model.init's output)"
        )
    paths = set(tree.batch_norm_layers(variables["batch_stats"]))

    def is_batch_norm(path: tuple[Any, ...], _: Any) -> bool:
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        return keys[:-1] in paths and keys[-1] in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(is_batch_norm, variables["params"])
