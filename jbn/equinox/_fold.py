"""``jbn.equinox.fold_batch_norms``: fold an Equinox model's batch norms into the layers before them.

One traced run of a copy of the model whose layers and batch norms are wrapped
in recorders finds the pairs (:mod:`jbn._fold_trace`); the folded model is the
original with those layers' weights and biases replaced and those batch norms
turned into a stateful identity, its state without their entries. Equinox
kernels hold the output features first: ``Linear`` (out, in), ``Conv`` and
``ConvTranspose`` (out, in/groups, *kernel).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._fold import fold_batch_norm
from .._fold_trace import Folded, Recorder, fold_traced
from ._batch_norm import BatchNorm
from ._forward import is_batch_norm
from ._state import state_entry

_TOOL = "jbn.equinox.fold_batch_norms"
_LAYERS = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
_BNS = (eqx.nn.BatchNorm, BatchNorm)


class _Recorders(threading.local):
    def __init__(self) -> None:
        self.stack: list[Recorder] = []


_recorders = _Recorders()


def _is_target(node: Any) -> bool:
    return isinstance(node, (*_LAYERS, *_BNS))


def _own_call(node: Any, bases: tuple[type, ...]) -> bool:
    """Whether ``node`` runs its base class's ``__call__`` (a subclass may only add fields)."""
    return any(isinstance(node, b) and type(node).__call__ is b.__call__ for b in bases)


class _RecordingLayer(eqx.Module):
    layer: Any
    name: str = eqx.field(static=True)

    def __call__(self, x: Any, *, key: Any = None) -> Any:
        y = self.layer(x, key=key)
        refusal = None
        if not _own_call(self.layer, _LAYERS):
            refusal = f"{type(self.layer).__qualname__} overrides __call__"
        elif jnp.ndim(y) == 0:
            refusal = "its output is a scalar (out_features='scalar')"
        _recorders.stack[-1].layer(self.name, y, 0, refusal)
        return y


class _RecordingBatchNorm(eqx.nn.StatefulLayer):
    layer: Any
    name: str = eqx.field(static=True)

    # An explicit __init__: StatefulLayer's abstract __call__ would read as a field.
    def __init__(self, layer: Any, name: str) -> None:
        self.layer = layer
        self.name = name

    def __call__(
        self, x: Any, state: eqx.nn.State, *, key: Any = None, inference: Any = None
    ) -> tuple[Any, eqx.nn.State]:
        refusal = None
        if not _own_call(self.layer, _BNS):
            refusal = f"{type(self.layer).__qualname__} overrides __call__"
        elif getattr(self.layer, "prior", None) is not None:
            refusal = f"it normalizes with a prior (prior={self.layer.prior})"
        _recorders.stack[-1].batch_norm(self.name, x, (0,), refusal)
        return self.layer(x, state, key=key, inference=True)


class _FoldedBatchNorm(eqx.nn.StatefulLayer):
    """A batch norm folded into the layer before it: the identity, state passed through."""

    def __init__(self) -> None:
        pass

    def __call__(
        self, x: Any, state: eqx.nn.State, *, key: Any = None, inference: Any = None
    ) -> tuple[Any, eqx.nn.State]:
        del key, inference
        return x, state


def _statistics(bn: Any, state: eqx.nn.State, where: str) -> dict[str, jax.Array]:
    """The running mean and variance a batch norm normalizes with in inference mode."""
    if isinstance(bn, BatchNorm):
        stored = state_entry(state, bn.state_index, where)
        return {"mean": stored["mean"], "var": stored["var"]}
    if bn.mode == "ema":
        assert bn.ema_state_index is not None
        mean, var = state_entry(state, bn.ema_state_index, where)
        return {"mean": mean, "var": var}
    # mode="batch": Equinox's own zero-debiasing of its hidden averages, as its inference does.
    assert bn.batch_counter is not None and bn.batch_state_index is not None
    counter = state_entry(state, bn.batch_counter, where)
    hidden_mean, hidden_var = state_entry(state, bn.batch_state_index, where)
    scale = jnp.where(counter == 0, 1, 1 - bn.momentum**counter)
    return {"mean": hidden_mean / scale, "var": hidden_var / scale}


def _with_bias(layer: Any, weight: jax.Array, bias: jax.Array) -> Any:
    """A copy of ``layer`` with new ``weight`` and ``bias`` and ``use_bias=True`` (a static field)."""
    new = object.__new__(type(layer))
    for field in dataclasses.fields(layer):
        object.__setattr__(new, field.name, getattr(layer, field.name))
    object.__setattr__(new, "weight", weight)
    object.__setattr__(new, "bias", bias.reshape((-1,) + (1,) * (weight.ndim - 2)))
    object.__setattr__(new, "use_bias", True)
    return new


def _axis_name(model: Any) -> Any:
    for leaf in jax.tree.leaves(model, is_leaf=is_batch_norm):
        if isinstance(leaf, _BNS):
            return leaf.axis_name
    return None


def fold_batch_norms(
    model: Any,
    state: eqx.nn.State,
    x: Any,
    *,
    forward: Callable[[Any, eqx.nn.State, Any], tuple[Any, eqx.nn.State]] | None = None,
    rtol: float = 1e-4,
) -> Folded:
    """Folds every batch norm of an Equinox model that directly follows a linear layer into it.

    One traced run on ``x`` finds the pairs: an ``eqx.nn.BatchNorm`` (``mode``
    ``"batch"`` or ``"ema"``) or ``jbn.equinox.BatchNorm`` whose input is the
    output of an ``eqx.nn.Linear``, ``Conv`` (any rank, grouped, depthwise) or
    ``ConvTranspose``, each called once. Each such layer gets the folded weight
    and bias (:func:`jbn.fold_batch_norm` with the output features first; a
    layer with ``use_bias=False`` gets a bias) and the batch norm becomes a
    stateful identity layer, whose state entries are dropped. Every other batch
    norm stays, with the reason in the report. The folded model is then compared
    with the original (in inference mode) on ``x``::

      >>> import equinox as eqx, jax, jbn.equinox
      >>> model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
      ...     eqx.nn.Linear(3, 4, key=jax.random.key(0)),
      ...     eqx.nn.BatchNorm(4, "batch", mode="batch")])
      >>> x = jax.random.normal(jax.random.key(1), (8, 3))
      >>> folded, folded_state = jbn.equinox.fold_batch_norms(model, state, x)

    The result also carries a :class:`~jbn.FoldReport` as ``.report``:
    ``folded`` (layer, batch norm) paths and ``left`` ``{batch norm: reason}``.

    Args:
      model: any pytree holding the layers and batch norms (modules,
        ``eqx.nn.Sequential``, lists).
      state: its ``eqx.nn.State``.
      x: a probe batch, traced once to find the pairs and used for the check.
      forward: ``forward(model, state, x) -> (output, state)`` runs a batch in
        inference mode; default ``jax.vmap(eqx.nn.inference_mode(model),
        axis_name=<the batch norms' axis_name>, in_axes=(0, None), out_axes=(0,
        None))(x, state)``. It is given the folded model too.
      rtol: the tolerance of the check, relative to the largest output (default 1e-4).

    Returns:
      ``(folded_model, folded_state)``, with ``.report``; ``model`` and ``state``
      are not modified.

    Raises:
      ValueError: the model runs no batch norm, none can be folded, or the folded
        model differs from the original on ``x`` by more than ``rtol`` (the
        difference is in the message).
    """
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"state must be the model's eqx.nn.State, got {type(state).__name__}; create it "
            "with eqx.nn.make_with_state"
        )
    if forward is None:
        axis_name = _axis_name(model)

        def vmapped(model: Any, state: eqx.nn.State, x: Any) -> tuple[Any, eqx.nn.State]:
            run = jax.vmap(
                eqx.nn.inference_mode(model),
                axis_name=axis_name,
                in_axes=(0, None),
                out_axes=(0, None),
            )
            return run(x, state)

        run_forward = vmapped
    elif callable(forward):
        run_forward = forward
    else:
        raise TypeError(f"forward must be callable as forward(model, state, x), got {forward!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_target)
    prefix = type(model).__name__
    names = {prefix + jax.tree_util.keystr(path): i for i, (path, _) in enumerate(leaves)}

    def recording(name: str, leaf: Any) -> Any:
        if isinstance(leaf, _LAYERS):
            return _RecordingLayer(leaf, name)
        if isinstance(leaf, _BNS):
            return _RecordingBatchNorm(leaf, name)
        return leaf

    def trace(recorder: Recorder) -> Any:
        wrapped = [recording(name, leaves[i][1]) for name, i in names.items()]
        _recorders.stack.append(recorder)
        try:
            # A fresh function each time, so that jit traces (and records) it.
            return eqx.filter_jit(lambda m, s, x: run_forward(m, s, x)[0])(
                jax.tree_util.tree_unflatten(treedef, wrapped), state, x
            )
        finally:
            _recorders.stack.pop()

    def fold(pairs: dict[str, str]) -> tuple[Any, eqx.nn.State]:
        new = [leaf for _, leaf in leaves]
        for bn_name, layer_name in pairs.items():
            bn, layer = new[names[bn_name]], new[names[layer_name]]
            running = _statistics(bn, state, bn_name)
            params = {"scale": bn.weight, "bias": bn.bias} if bn.channelwise_affine else None
            bias = None if layer.bias is None else layer.bias.reshape(-1)
            weight, bias = fold_batch_norm(
                layer.weight, bias, params, running, epsilon=bn.eps, feature_axis=0
            )
            new[names[layer_name]] = _with_bias(layer, weight, bias)
            new[names[bn_name]] = _FoldedBatchNorm()
        folded = jax.tree_util.tree_unflatten(treedef, new)
        return folded, state.substate(folded)

    def run(folded: tuple[Any, eqx.nn.State]) -> Any:
        return eqx.filter_jit(lambda m, s, x: run_forward(m, s, x)[0])(*folded, x)

    (folded_model, folded_state), report = fold_traced(_TOOL, trace, fold, run, rtol)
    return Folded(folded_model, folded_state, report)
