"""``jbn.nnx``: batch normalization for Flax NNX on the jbn core.

``jbn.nnx.BatchNorm`` is a drop-in replacement for ``flax.nnx.BatchNorm`` (the
same constructor, call signature and variables), and
``jbn.nnx.recalibrate_batch_stats`` recomputes the running statistics of a
model's jbn batch norms from data.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from . import _batch_norm, _recalibrate

__all__ = ("BatchNorm", "recalibrate_batch_stats")

_NO_MODE = (
    "No `use_running_average` argument was provided to jbn.nnx.BatchNorm. Pass it to the "
    "constructor (jbn.nnx.BatchNorm(..., use_running_average=True/False)), to the call "
    "(bn(x, use_running_average=True/False)), or set it with model.train() / model.eval()"
)


class BatchNorm(nnx.Module):
    """Batch normalization for Flax NNX, with jbn's analytic backward pass.

    A drop-in replacement for :class:`flax.nnx.BatchNorm`: the same arguments,
    ``model.train()`` / ``model.eval()`` (which set ``use_running_average``) and
    ``nnx.view``, and the same variables ``scale``, ``bias`` (``nnx.Param``),
    ``mean``, ``var`` (``nnx.BatchStat``, float32)::

      >>> import jax, jbn
      >>> from flax import nnx
      >>> bn = jbn.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 4))
      >>> y = bn(x)        # training mode: batch statistics, updates mean and var
      >>> bn.eval()
      >>> y = bn(x)        # running statistics

    Differences from flax: the statistics are always exact (``use_fast_variance``
    is accepted and ignored), and the running statistics are used in float32
    even when ``dtype`` is lower.

    Args:
      num_features: the size of the feature axis (a tuple of sizes for several
        feature axes, e.g. ``axis=(1, 2, 3)``).
      use_running_average: True: running statistics (evaluation); False (default):
        batch statistics, updating the running ones (training).
      axis: the feature axis or axes (default -1).
      momentum: running-average decay, ``new = momentum * old + (1 - momentum) *
        batch`` (default 0.99). None: cumulative average of all batches so far,
        with an int32 ``count`` batch statistic.
      epsilon: added to the variance (default 1e-5).
      dtype: output dtype (default: ``x`` promoted with the variables, as flax).
      param_dtype: dtype of ``scale`` and ``bias`` (default float32).
      use_bias: learn ``bias`` (β).
      use_scale: learn ``scale`` (γ).
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: named axis (pmap, shard_map) whose devices share statistics.
      axis_index_groups: groups of devices along ``axis_name``.
      use_fast_variance: accepted for compatibility; jbn is always exact.
      promote_dtype: flax's dtype promotion of ``(x, mean, var, scale, bias)``.
      rngs: random generators for the initializers.
      bias_metadata: metadata of the ``bias`` Param.
      scale_metadata: metadata of the ``scale`` Param.
      unbiased_running_var: store the running variance with Bessel's correction.
      residual: what the backward pass keeps, ``"input"`` (x) or ``"output"`` (y).
      min_scale: smallest |γ| used with ``residual="output"`` (default 1e-3).
      virtual_batch_size: ghost batch norm: normalize groups of this many
        examples (axis 0) with their own statistics in training.
      renorm: batch renormalization (Ioffe 2017) in training.
      rmax: renorm's bound on r (default 3.0); overridable per call.
      dmax: renorm's bound on |d| (default 5.0); overridable per call.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        unbiased_running_var: bool = False,
        residual: str = "input",
        min_scale: float = 1e-3,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
    ):
        feature_shape = (
            (num_features,) if isinstance(num_features, numbers.Integral) else tuple(num_features)
        )
        if not feature_shape or not all(
            isinstance(s, numbers.Integral) and s > 0 for s in feature_shape
        ):
            raise ValueError(
                f"num_features must be a positive int (or tuple of them), got {num_features!r}"
            )
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        if momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        else:
            self.count = nnx.data(None)
        if use_scale:
            self.scale = nnx.Param(
                scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)
        # Set by recalibrate_batch_stats while it collects statistics.
        self.recalibration = nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.unbiased_running_var = unbiased_running_var
        self.residual = residual
        self.min_scale = min_scale
        self.virtual_batch_size = virtual_batch_size
        self.renorm = renorm
        self.rmax = rmax
        self.dmax = dmax

    def __call__(
        self,
        x: jax.typing.ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: jax.typing.ArrayLike | None = None,
        rmax: float | jax.typing.ArrayLike | None = None,
        dmax: float | jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; in training mode also updates ``mean`` and ``var``.

        Args:
          x: input, e.g. (N, C) or (N, H, W, C).
          use_running_average: overrides the attribute for this call.
          mask: boolean, broadcastable to ``x``; only True entries enter the
            statistics.
          rmax: renorm's bound on r for this call (default: the attribute).
          dmax: renorm's bound on |d| for this call (default: the attribute).

        Returns:
          The normalized ``x``, same shape.
        """
        use_running_average = first_from(
            use_running_average, self.use_running_average, error_msg=_NO_MODE
        )
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # flax promotes x with every variable first and normalizes the promoted x.
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        state = {"mean": self.mean[...], "var": self.var[...]}
        if self.count is not None:
            state["count"] = self.count[...]
        train = not use_running_average
        if self.recalibration is not None:
            self.recalibration.set_value(
                _recalibrate.accumulate(
                    self.recalibration.get_value(),
                    x,
                    axis=self.axis,
                    mask=mask,
                    axis_name=_recalibrate.bound_axis_name(self.axis_name),
                    axis_index_groups=self.axis_index_groups,
                    unbiased=self.unbiased_running_var,
                )
            )
        y, new_state = _batch_norm.bn_forward(
            params,
            state,
            x,
            train,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            unbiased_running_var=self.unbiased_running_var,
            residual=self.residual,
            min_scale=self.min_scale,
            virtual_batch_size=self.virtual_batch_size,
            renorm=self.renorm,
            rmax=self.rmax if rmax is None else rmax,
            dmax=self.dmax if dmax is None else dmax,
        )
        if train and self.recalibration is None:
            self.mean[...] = new_state["mean"]
            self.var[...] = new_state["var"]
            if self.count is not None:
                self.count[...] = new_state["count"]
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``.

        Args:
          use_running_average: if not None, the new ``use_running_average``.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def recalibrate_batch_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    passes: int = 1,
) -> None:
    """Recomputes, in place, the running statistics of every ``jbn.nnx.BatchNorm`` in ``model``.

    The NNX counterpart of :func:`jbn.recalibrate_batch_stats`: each layer's
    ``mean`` and ``var`` become the exact statistics of all the values its input
    took over ``batches`` (each batch weighted by its count, variances combined
    with Chan et al.'s parallel formula). Parameters are untouched. The model's
    mode decides what the layers pass on while collecting: after
    ``model.train()`` each normalizes with its batch's statistics (one pass
    suffices); after ``model.eval()`` with the running statistics of the previous
    pass, so ``passes`` = the depth in batch-norm layers makes every layer exact
    for evaluation. A cumulative layer (``momentum=None``) gets ``count`` = the
    number of batches.

    Args:
      model: an NNX module containing ``jbn.nnx.BatchNorm`` layers.
      batches: an iterable of inputs for ``forward``; a list (re-iterable) when
        ``passes > 1``.
      forward: ``(model, batch) -> anything``, run under ``nnx.jit`` (default:
        ``model(batch)``).
      passes: how many times to go over ``batches`` (default 1).
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    layers = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
    if not layers:
        raise ValueError(
            "model contains no jbn.nnx.BatchNorm layer (flax.nnx.BatchNorm layers do not recalibrate)"
        )
    forward = (lambda m, b: m(b)) if forward is None else forward
    step = nnx.jit(lambda m, b: forward(m, b))
    try:
        for p in range(passes):
            for _, layer in layers:
                layer.recalibration = nnx.BatchStat(_recalibrate.new_accumulator(layer.mean[...]))
            n_batches = 0
            for batch in batches:
                step(model, batch)
                n_batches += 1
            if n_batches == 0:
                raise ValueError(
                    "batches yielded no batch"
                    + (
                        f" on pass {p + 1}: with passes > 1 give a list or another re-iterable, not a generator"
                        if p
                        else ""
                    )
                )
            missing = [
                "/".join(map(str, path))
                for path, layer in layers
                if not bool(jnp.any(layer.recalibration.get_value()["count"] > 0))
            ]
            if missing:
                raise ValueError(
                    f"these batch-norm layers were not recalibrated: {missing}: forward must call each, "
                    "and each needs at least one unmasked value"
                )
            for _, layer in layers:
                acc = layer.recalibration.get_value()
                seen = acc["count"] > 0  # a feature that never had a value keeps its statistics
                for name in ("mean", "var"):
                    old = getattr(layer, name)[...]
                    getattr(layer, name)[...] = jnp.where(seen, acc[name], old).astype(old.dtype)
                if layer.count is not None:
                    layer.count[...] = jnp.asarray(n_batches, layer.count[...].dtype)
    finally:
        for _, layer in layers:
            layer.recalibration = None
