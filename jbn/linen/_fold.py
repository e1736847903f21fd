"""``fold_batch_norms``: fold a linen model's batch norms into the layers before them.

No second model: a flax method interceptor (``flax.linen.intercept_methods``)
records one traced run (:mod:`jbn._fold_trace` decides the pairs), and the
folded function runs the same ``apply_fn`` under another interceptor that turns
each folded batch norm into the identity and adds the folded bias after a layer
that had none.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax.linen.module import InterceptorContext

from .. import _tree as tree
from .._fold import fold_pair, with_collections
from .._fold_trace import Folded, Recorder, feature_axes, fold_traced
from ._batch_norm import BatchNorm
from ._calls import SubclassCalls, never_reaches_base

_TOOL = "jbn.linen.fold_batch_norms"


def _raw(cls: type) -> Any:
    # flax keeps the undecorated method as __wrapped__, which its declared type does not show.
    return cls.__call__.__wrapped__  # pyright: ignore[reportAttributeAccessIssue]


def _layer(module: nn.Module) -> tuple[int, str | None] | None:
    """``(the kernel's output-feature axis, refusal or None)`` of a linear layer's own
    ``__call__``; None for any other module."""
    if isinstance(module, nn.ConvLocal):
        return -1, "ConvLocal has a bias per output position"
    if isinstance(module, (nn.Dense, nn.Conv)):
        return -1, None
    if isinstance(module, nn.ConvTranspose):
        return (-2 if module.transpose_kernel else -1), None
    if isinstance(module, nn.DenseGeneral):
        features = (module.features,) if isinstance(module.features, int) else module.features
        if len(features) != 1 or module.batch_dims:
            return -1, "a DenseGeneral with several output feature axes or batch_dims"
        return -1, None
    if isinstance(module, nn.Einsum):
        return -1, "folding into an Einsum is not supported"
    return None


_LAYER_CALLS = tuple(map(_raw, (nn.Dense, nn.Conv, nn.ConvTranspose, nn.DenseGeneral, nn.Einsum)))


class _State(threading.local):
    def __init__(self) -> None:
        self.calls = SubclassCalls()
        self.depth = 0  # batch-norm base calls running (intercept() nests jbn's in flax's)


_state = _State()


def _x(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs["x"]  # flax's and jbn's BatchNorm name it x


def _dispatch(
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: InterceptorContext,
    on_layer: Callable[[nn.Module, tuple[int, str | None], Any], Any],
    on_bn: Callable[[nn.Module, Any, Callable[[], Any]], Any],
) -> Any:
    """Routes a call: a linear layer's own ``__call__`` (its output) to ``on_layer``, a
    batch norm's (not nested in another's) to ``on_bn(module, x, run_it)``, everything
    else unchanged."""
    module = context.module
    if context.method_name == "__call__" and getattr(context.orig_method, "func", None) in (
        _LAYER_CALLS
    ):
        spec = _layer(module)
        if spec is not None:
            return on_layer(module, spec, next_fun(*args, **kwargs))

    def base(module: nn.Module) -> Any:
        if _state.depth:
            return next_fun(*args, **kwargs)
        _state.depth += 1
        try:
            return on_bn(module, _x(args, kwargs), lambda: next_fun(*args, **kwargs))
        finally:
            _state.depth -= 1

    return _state.calls.dispatch(
        next_fun,
        args,
        kwargs,
        context,
        active=True,
        on_base=base,
        error=never_reaches_base(f"{_TOOL} cannot fold"),
    )


def _path(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.scope.path) if module.scope is not None else ()


def fold_batch_norms(
    apply_fn: Callable[[Any, Any], Any],
    variables: Mapping[str, Any],
    x: Any,
    *,
    rtol: float = 1e-4,
) -> Folded:
    """Folds every batch norm of a linen model that directly follows a linear layer into it.

    ``apply_fn(variables, x)`` runs the model in evaluation mode (e.g.
    ``lambda v, x: model.apply(v, x, train=False)``). One traced run finds the
    pairs: a ``flax.linen.BatchNorm`` or ``jbn.BatchNorm`` (also under
    :func:`jbn.linen.intercept`) whose input is the output of a ``Dense``,
    ``Conv`` (any rank, grouped, depthwise), ``ConvTranspose`` or single-feature
    ``DenseGeneral``, each called once, normalizing that layer's output features.
    Each such batch norm is folded (:func:`jbn.fold_batch_norm`); every other one
    stays as it is, with the reason in the report. The folded model is then
    compared with the original on ``x``::

      >>> import jax, jax.numpy as jnp, flax.linen as nn, jbn
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> folded_apply, folded_variables = jbn.linen.fold_batch_norms(model.apply, variables, x)
      >>> sorted(folded_variables)
      ['params']

    ``folded_apply(folded_variables, x, ...)`` runs the same ``apply_fn`` (the
    model needs no switch and no second definition) with each folded batch norm
    as the identity, and adds the folded bias after a layer that had none;
    it can be jitted and exported (``jax.export``). The result also carries a
    :class:`~jbn.FoldReport` as ``.report``: ``folded`` (layer, batch norm) paths
    and ``left`` ``{batch norm: reason}``.

    Args:
      apply_fn: ``apply_fn(variables, x)`` runs the model in evaluation mode.
      variables: its variables, with ``params`` and ``batch_stats``.
      x: a probe batch, traced once to find the pairs and used for the check.
      rtol: the tolerance of the check, relative to the largest output (default 1e-4).

    Returns:
      ``(folded_apply_fn, folded_variables)``, with ``.report``. In the variables
      the layers' kernels and biases are replaced (a bias is added where there was
      none), the folded batch norms' ``params`` and ``batch_stats`` removed, and
      ``batch_stats`` dropped when empty.

    Raises:
      ValueError: the model runs no batch norm, none can be folded, or the folded
        model differs from the original on ``x`` by more than ``rtol`` (the
        difference is in the message).
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable as apply_fn(variables, x), got {apply_fn!r}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a linen model's variables with a 'params' collection")
    variables = tree.to_dicts(variables)
    names: dict[str, tuple[tuple[str, ...], int, bool, float]] = {}  # name -> path, axis, bias, ε

    def trace(recorder: Recorder) -> Any:
        def on_layer(module: nn.Module, spec: tuple[int, str | None], y: Any) -> Any:
            name = "/".join(_path(module))
            names[name] = (_path(module), spec[0], getattr(module, "use_bias", True), 0.0)
            recorder.layer(name, y, -1, spec[1])
            return y

        def on_bn(module: nn.Module, x: Any, run_it: Callable[[], Any]) -> Any:
            name = "/".join(_path(module))
            names[name] = (_path(module), 0, True, module.epsilon)
            prior = getattr(module, "prior", None) if isinstance(module, BatchNorm) else None
            refusal = None if prior is None else f"it normalizes with a prior (prior={prior})"
            recorder.batch_norm(name, x, feature_axes(module.axis, x.ndim), refusal)
            return run_it()

        def interceptor(next_fun: Any, args: Any, kwargs: Any, context: InterceptorContext) -> Any:
            return _dispatch(next_fun, args, kwargs, context, on_layer, on_bn)

        @jax.jit
        def run(variables: Any, x: Any) -> Any:
            with nn.intercept_methods(interceptor):
                return apply_fn(variables, x)

        return run(variables, x)

    def fold(pairs: dict[str, str]) -> tuple[Callable[..., Any], dict[str, Any]]:
        params, stats = variables["params"], variables.get("batch_stats", {})
        add_bias = set()
        for bn, layer in pairs.items():
            layer_path, kernel_axis, has_bias, _ = names[layer]
            bn_path, _, _, epsilon = names[bn]
            params, stats = fold_pair(
                params, stats, layer_path, bn_path, epsilon, feature_axis=kernel_axis
            )
            if not has_bias:
                add_bias.add(layer_path)
        folded_bns = {names[bn][0] for bn in pairs}
        return _folded_apply(apply_fn, folded_bns, add_bias), with_collections(
            variables, params, stats
        )

    (folded_apply, folded_variables), report = fold_traced(
        _TOOL, trace, fold, lambda f: jax.jit(f[0])(f[1], x), rtol
    )
    return Folded(folded_apply, folded_variables, report)


def _folded_apply(
    apply_fn: Callable[..., Any],
    folded_bns: set[tuple[str, ...]],
    add_bias: set[tuple[str, ...]],
) -> Callable[..., Any]:
    """``apply_fn`` with the folded batch norms as the identity and the added biases added."""

    def on_layer(module: nn.Module, _: Any, y: Any) -> Any:
        if _path(module) in add_bias:
            bias = module.get_variable("params", "bias").astype(y.dtype)
            return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        return y

    def on_bn(module: nn.Module, x: Any, run_it: Callable[[], Any]) -> Any:
        return x if _path(module) in folded_bns else run_it()

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: InterceptorContext) -> Any:
        return _dispatch(next_fun, args, kwargs, context, on_layer, on_bn)

    @functools.wraps(apply_fn)
    def folded_apply_fn(variables: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(interceptor):
            return apply_fn(variables, x, *args, **kwargs)

    return folded_apply_fn
