"""Frozen batch norm for fine-tuning, and optax masks that pick out batch-norm parameters.

A pretrained network's running statistics describe the data it was trained on;
when fine-tuning on little data it often pays to keep them (torchvision's
``FrozenBatchNorm2d``, timm's ``freeze_batch_norm_2d``, Keras's
``trainable=False``): each batch norm normalizes with its running statistics,
updates nothing, and optionally passes no gradient to its scale and bias.

* Linen: :func:`frozen_batch_norms`, a context manager (and decorator) under which
  every ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` is frozen, whatever
  ``use_running_average`` the model passes (so dropout can stay in training
  mode).
* NNX: :func:`freeze_batch_norms` swaps every ``flax.nnx.BatchNorm`` and
  ``jbn.nnx.BatchNorm`` for a :class:`FrozenBatchNorm` holding the same variables
  (same paths), which ``model.train()`` leaves frozen;
  :func:`unfreeze_batch_norms` swaps them back.
* Optimizers: :func:`batch_norm_mask` (linen variables) and
  :func:`nnx_batch_norm_mask` (NNX models) give a bool pytree, True on the
  batch-norm parameters; :func:`optimize_only` turns a mask into an optax
  transformation that updates only the True leaves ("train only the batch
  norms"; negate the mask to freeze them).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import optax
from flax import linen as nn
from flax import nnx
from flax.linen import dtypes as linen_dtypes
from flax.nnx import graph

from ._batch_norm import bn_forward
from ._graph import replace_modules
from ._linen import BatchNorm
from ._linen_calls import SubclassCalls
from ._nnx import BatchNorm as JbnNnxBatchNorm

__all__ = (
    "FrozenBatchNorm",
    "batch_norm_mask",
    "freeze_batch_norms",
    "frozen_batch_norms",
    "nnx_batch_norm_mask",
    "optimize_only",
    "unfreeze_batch_norms",
)


# ---- linen --------------------------------------------------------------------


class _State(threading.local):
    def __init__(self):
        self.stop_gradient: list[bool] = []  # one entry per active frozen_batch_norms()
        self.calls = SubclassCalls()


_state = _State()


def _raw_calls() -> tuple[Any, ...]:
    return (nn.BatchNorm.__call__.__wrapped__, BatchNorm.__call__.__wrapped__)


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


def _freezing_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        not _state.stop_gradient
        or context.method_name != "__call__"
        or not isinstance(module, (nn.BatchNorm, BatchNorm))
    ):
        return next_fun(*args, **kwargs)
    if getattr(context.orig_method, "func", None) in _raw_calls():
        _state.calls.reached_base()
        if module.is_initializing() or not module.has_variable("batch_stats", "mean"):
            return next_fun(*args, **kwargs)  # creates the variables; init updates nothing
        x = args[0] if args else kwargs["x"]
        return _frozen_forward(module, x, _state.stop_gradient[-1])
    return _state.calls.run(
        next_fun,
        args,
        kwargs,
        lambda: TypeError(
            f"jbn's frozen_batch_norms cannot freeze {type(module).__qualname__}: its "
            "__call__ never calls flax.linen.BatchNorm's or jbn.BatchNorm's __call__, so it "
            "would keep normalizing with its own code"
        ),
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
      >>> from jbn._freeze import frozen_batch_norms
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> with frozen_batch_norms():
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> bool((updates["batch_stats"]["layers_1"]["mean"] == 0).all())
      True

    Like :func:`jbn.linen.intercept`, it works as a decorator, the safe way to
    combine it with ``jax.jit`` (jit replays what it traced). ``init`` is left as
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
        with nn.intercept_methods(_freezing_interceptor):
            yield
    finally:
        _state.stop_gradient.pop()


def _batch_norm_paths(batch_stats: Any, prefix: tuple = ()) -> set[tuple]:
    """Paths of the modules whose batch_stats hold ``mean`` and ``var`` (batch norms)."""
    paths = set()
    if isinstance(batch_stats, Mapping):
        if "mean" in batch_stats and "var" in batch_stats:
            paths.add(prefix)
        for key, value in batch_stats.items():
            paths |= _batch_norm_paths(value, (*prefix, key))
    return paths


def batch_norm_mask(variables: Mapping[str, Any]) -> Any:
    """A bool pytree over ``variables["params"]``: True on the batch-norm parameters.

    A batch-norm layer is recognised from the variables alone, as a module path
    whose ``batch_stats`` hold ``mean`` and ``var`` (what ``flax.linen.BatchNorm``
    and ``jbn.BatchNorm`` create, also under :func:`jbn.linen.intercept`); its
    ``scale`` and ``bias`` at the same path in ``params`` are True, every other
    leaf False. Use it with :func:`optimize_only`, ``optax.masked`` or
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
    paths = _batch_norm_paths(variables["batch_stats"])

    def is_batch_norm(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        return keys[:-1] in paths and keys[-1] in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(is_batch_norm, variables["params"])


def optimize_only(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``mask`` is True; zero updates everywhere else.

    ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)``: the
    masked-out leaves do not move at all (no weight decay either), and ``tx``
    keeps state only for the others. With a batch-norm mask::

      optimize_only(tx, mask)                                # train only the batch norms
      optimize_only(tx, jax.tree.map(lambda m: not m, mask)) # freeze the batch norms

    (``optax.masked(tx, mask)`` is not the same: it passes the raw gradient
    through as the update of the masked-out leaves.)

    Args:
      tx: the optimizer for the selected leaves.
      mask: a pytree of bools with the structure of the parameters (or a
        function of the parameters returning one).

    Returns:
      The combined gradient transformation.
    """
    return optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)


# ---- NNX -----------------------------------------------------------------------


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

    def __init__(self, layer: nnx.Module, *, stop_gradient: bool = False):
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

    def __call__(self, x: jax.typing.ArrayLike, use_running_average: Any = None, **_: Any):
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


def _batch_norm_types() -> tuple[type, ...]:
    return (nnx.BatchNorm, JbnNnxBatchNorm)


def freeze_batch_norms(model: Any, *, stop_gradient: bool = False) -> Any:
    """Freezes, in place, every ``flax.nnx.BatchNorm`` and ``jbn.nnx.BatchNorm`` of a model.

    Each becomes a :class:`FrozenBatchNorm` with the same variables: normalized
    with the running statistics, nothing updated, even after ``model.train()``
    (which still puts dropout in training mode)::

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jbn._freeze import freeze_batch_norms
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
        of the optimizer as well if it has weight decay: :func:`nnx_batch_norm_mask`).

    Returns:
      ``model``, changed in place (the new layer if ``model`` is itself a batch norm).
    """
    if not isinstance(stop_gradient, bool):
        raise TypeError(f"stop_gradient must be a bool, got {stop_gradient!r}")
    types = _batch_norm_types()

    def check(layer):
        if type(layer) not in types:
            raise TypeError(
                f"freeze_batch_norms cannot freeze {type(layer).__qualname__}, a subclass of "
                f"{', '.join(t.__module__ + '.' + t.__qualname__ for t in types)}: its own "
                "behaviour would be lost"
            )
        recalibrating = getattr(layer, "recalibration", None) is not None
        if recalibrating:
            raise ValueError("freeze_batch_norms: a layer is being recalibrated")

    for _, node in [((), model), *graph.iter_graph(model)]:
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
    import inspect

    return frozenset(inspect.signature(cls.__init__).parameters)


def nnx_batch_norm_mask(model: nnx.Module, wrt: Any = nnx.Param) -> Any:
    """A bool pytree over the model's ``wrt`` state: True on the batch-norm parameters.

    The structure is that of ``nnx.as_pure(nnx.state(model, wrt))``, the tree
    ``nnx.Optimizer(model, tx, wrt=wrt)`` hands to optax, so the mask works with
    :func:`optimize_only`, ``optax.masked`` and ``optax.multi_transform``.
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
    state = nnx.state(model, wrt)
    flat = nnx.to_flat_state(state)
    mask = [(path, path[:-1] in layers) for path, _ in flat]
    return nnx.as_pure(nnx.from_flat_state(mask))
