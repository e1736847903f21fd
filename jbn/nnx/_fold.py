"""``jbn.nnx.fold_batch_norms``: fold an NNX model's batch norms into the layers before them, in place.

One run with the layers and batch norms wrapped in recorders
(:func:`jbn.nnx._graph.replace_modules`, undone after) finds the pairs
(:mod:`jbn._fold_trace`); each folded layer then holds the folded kernel and bias
(the same Variable objects where it had them) and each folded batch norm is
replaced by an identity module.
"""

from __future__ import annotations

import threading
from typing import Any

from flax import nnx

from .._fold import fold_batch_norm
from .._fold_trace import FoldReport, Recorder, feature_axes, fold_traced
from ._batch_norm import BatchNorm as JbnNnxBatchNorm
from ._freeze import FrozenBatchNorm
from ._graph import module_paths, replace_modules

_TOOL = "jbn.nnx.fold_batch_norms"
_LAYERS = (nnx.Linear, nnx.Conv, nnx.ConvTranspose, nnx.LinearGeneral, nnx.Einsum)
_BNS = (nnx.BatchNorm, JbnNnxBatchNorm, FrozenBatchNorm)


class _Recorders(threading.local):
    def __init__(self) -> None:
        self.stack: list[Recorder] = []


_recorders = _Recorders()


def _refusal(module: nnx.Module, bases: tuple[type, ...]) -> str | None:
    if not any(isinstance(module, b) and type(module).__call__ is b.__call__ for b in bases):
        return f"{type(module).__qualname__} overrides __call__"
    if isinstance(module, nnx.Einsum):
        return "folding into an Einsum is not supported"
    if isinstance(module, nnx.LinearGeneral) and (
        len(module.out_features) != 1 or module.batch_axis
    ):
        return "a LinearGeneral with several output feature axes or batch axes"
    return None


def _kernel_axis(layer: nnx.Module) -> int:
    """The kernel's output-feature axis (flax keeps it last, transposed kernels aside)."""
    return -2 if getattr(layer, "transpose_kernel", False) else -1


class _RecordingLayer(nnx.Module):
    def __init__(self, layer: nnx.Module, name: str) -> None:
        self.layer = layer
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        y = self.layer(*args, **kwargs)
        _recorders.stack[-1].layer(self.name, y, -1, _refusal(self.layer, _LAYERS))
        return y


class _RecordingBatchNorm(nnx.Module):
    def __init__(self, layer: nnx.Module, name: str) -> None:
        self.layer = layer
        self.name = name

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        refusal = _refusal(self.layer, _BNS)
        axes = feature_axes(getattr(self.layer, "axis"), x.ndim)  # noqa: B009 (any batch norm)
        _recorders.stack[-1].batch_norm(self.name, x, axes, refusal)
        return self.layer(x, use_running_average=True)


class _FoldedBatchNorm(nnx.Module):
    """A batch norm folded into the layer before it: the identity."""

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def _run(model: nnx.Module, x: Any) -> Any:
    """``model(x)``, jitted: a fresh function, so that it is traced (and recorded) each time."""
    return nnx.jit(lambda model, x: model(x))(model, x)


def _unwrap(model: Any) -> None:
    replace_modules(
        model, lambda m: isinstance(m, (_RecordingLayer, _RecordingBatchNorm)), lambda w: w.layer
    )


def fold_batch_norms(model: nnx.Module, x: Any, *, rtol: float = 1e-4) -> FoldReport:
    """Folds, in place, every batch norm of an NNX model that directly follows a linear layer.

    One run of ``model(x)`` finds the pairs: a ``flax.nnx.BatchNorm``,
    ``jbn.nnx.BatchNorm`` or :class:`jbn.nnx.FrozenBatchNorm` whose input is the
    output of an ``nnx.Linear``, ``Conv`` (any rank, grouped, depthwise),
    ``ConvTranspose`` or single-feature ``LinearGeneral``, each called once. Each
    such layer gets the folded kernel and bias (:func:`jbn.fold_batch_norm`; a
    layer without bias gets one) and the batch norm is replaced by an identity
    module; every other batch norm stays, with the reason in the report. The
    batch norms run with their running statistics; put the rest of the model in
    evaluation mode first (``model.eval()``, for dropout). The folded model is
    then compared with the original on ``x``::

      >>> import jax, jbn.nnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> report = jbn.nnx.fold_batch_norms(model, jax.random.normal(jax.random.key(1), (8, 3)))
      >>> report.folded
      (('layers/0', 'layers/1'),)

    Args:
      model: an NNX module.
      x: a probe batch, ``model(x)``, run once to find the pairs and for the check.
      rtol: the tolerance of the check, relative to the largest output (default 1e-4).

    Returns:
      A :class:`~jbn.FoldReport`: ``folded`` (layer, batch norm) paths and ``left``
      ``{batch norm: reason}``.

    Raises:
      ValueError: the model runs no batch norm, none can be folded, or the folded
        model differs from the original on ``x`` by more than ``rtol`` (the
        difference is in the message). The model is then left as it was.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an NNX module, got {type(model).__name__}")
    # The model itself cannot be swapped in place: a lone layer or batch norm has no pair.
    paths = module_paths(model, lambda m: isinstance(m, (*_LAYERS, *_BNS)) and m is not model)
    modules: dict[str, Any] = {}
    # (layer, kernel, bias attribute, its value, use_bias)
    undo: list[tuple[Any, Any, Any, Any, Any]] = []
    restore: dict[int, tuple[nnx.Module, nnx.Module]] = {}  # id(identity) -> (identity, bn)

    def wrap(module: nnx.Module) -> nnx.Module:
        name = paths[id(module)]
        modules[name] = module
        if isinstance(module, _LAYERS):
            return _RecordingLayer(module, name)
        return _RecordingBatchNorm(module, name)

    def trace(recorder: Recorder) -> Any:
        replace_modules(model, lambda m: id(m) in paths, wrap)
        _recorders.stack.append(recorder)
        try:
            return _run(model, x)
        finally:
            _recorders.stack.pop()
            _unwrap(model)

    def fold(pairs: dict[str, str]) -> None:
        for bn_name, layer_name in pairs.items():
            bn, layer = modules[bn_name], modules[layer_name]
            params = {
                k: getattr(bn, k)[...] for k in ("scale", "bias") if getattr(bn, k) is not None
            }
            running = {k: getattr(bn, k)[...] for k in ("mean", "var")}
            bias = None if layer.bias is None else layer.bias[...]
            kernel, bias = fold_batch_norm(
                layer.kernel[...],
                bias,
                params,
                running,
                epsilon=bn.epsilon,
                feature_axis=_kernel_axis(layer),
            )
            old_bias = None if layer.bias is None else layer.bias[...]
            undo.append((layer, layer.kernel[...], layer.bias, old_bias, layer.use_bias))
            layer.kernel[...] = kernel
            if layer.bias is None:
                layer.bias = nnx.Param(bias)
                layer.use_bias = True
            else:
                layer.bias[...] = bias
        folded = {id(modules[bn]) for bn in pairs}

        def identity(bn: nnx.Module) -> nnx.Module:
            new = _FoldedBatchNorm()
            restore[id(new)] = (new, bn)
            return new

        replace_modules(model, lambda m: id(m) in folded, identity)

    try:
        _, report = fold_traced(_TOOL, trace, fold, lambda _: _run(model, x), rtol)
    except BaseException:
        replace_modules(model, lambda m: id(m) in restore, lambda m: restore[id(m)][1])
        for layer, kernel, bias, bias_value, use_bias in reversed(undo):
            layer.kernel[...] = kernel
            if bias is None:
                layer.bias = nnx.data(None)
            else:
                bias[...] = bias_value
            layer.use_bias = use_bias
        raise
    return report
