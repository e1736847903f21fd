"""``jbn.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm`` on the jbn core.

The same constructor, call signature and variables. The module only fetches
variables, calls :func:`jbn.bn_forward` and stores what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from .. import _checks as checks
from .. import _options as options
from .._accumulate import ACCUMULATOR, Accumulate
from .._batch_norm import bn_forward
from .._checks import PriorForm, Residual
from .._modes import Mode, layer_mode
from .._relay import Link, linked
from .._stream import MEMORY, Stream

# flax.nnx.BatchNorm's settings, kept as attributes under flax's names.
_SETTINGS = (
    "num_features",
    "use_running_average",
    "axis",
    "momentum",
    "epsilon",
    "dtype",
    "param_dtype",
    "use_bias",
    "use_scale",
    "axis_name",
    "axis_index_groups",
    "use_fast_variance",
    "promote_dtype",
)
_NO_MODE = (
    "No `use_running_average` argument was provided to jbn.nnx.BatchNorm. Pass it to the "
    "constructor (jbn.nnx.BatchNorm(..., use_running_average=True/False)), to the call "
    "(bn(x, use_running_average=True/False)), or set it with model.train() / model.eval()"
)


@options.document
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
        with an int32 ``count`` batch statistic (per feature: the batches each
        feature counted).
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
      <jbn options>
    """

    if TYPE_CHECKING:  # set in __init__: flax's settings as given, then jbn's options
        num_features: int | Sequence[int]
        use_running_average: bool | None
        axis: int | Sequence[int]
        momentum: float | None
        epsilon: float
        dtype: Dtype | None
        promote_dtype: PromoteDtypeFn
        prior: jax.typing.ArrayLike | None  # a number, or a scalar array set by jbn.nnx.use_prior
        prior_form: PriorForm
        stream: Stream | None  # set by jbn.nnx.use_stream
        stream_link: Link | None  # its place on the model's relay, likewise
        accumulation: Accumulate | None  # set by jbn.nnx.use_accumulation

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
        finite_running_stats: bool = True,
        residual: Residual = "input",
        min_scale: float = 1e-3,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
        prior: float | None = None,
        prior_form: PriorForm = "pooled",
    ) -> None:
        feature_shape = checks.feature_shape(num_features, "num_features")
        checks.momentum(momentum)
        checks.positive_float(epsilon, "epsilon")
        checks.axis_index_groups(axis_index_groups, checks.axis_name(axis_name))
        given = locals()
        jbn_options = options.check_all({name: given[name] for name in options.JBN})
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        if momentum is None:
            self.count = nnx.BatchStat(jnp.zeros(feature_shape, jnp.int32))
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
        for name in _SETTINGS:
            setattr(self, name, given[name])
        for name, value in jbn_options.items():
            setattr(self, name, value)

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
        x, params, state = self.prepare(x)
        _check_features(self, x.shape)
        mode = _mode(self, not use_running_average)
        # What a stream or an accumulation carries beside the running statistics (left alone).
        carried = {Stream: MEMORY, Accumulate: ACCUMULATOR}.get(type(mode), ())
        state |= {k: getattr(self, k)[...] for k in carried}
        kwargs = options.forward_kwargs(self, rmax=rmax, dmax=dmax)
        with linked(getattr(self, "stream_link", None)):
            y, new_state = bn_forward(
                params, state, x, mode, mask=mask, **{**kwargs, "prior": None}
            )
        if mode is True:
            _store(self, new_state)
        else:
            for k in carried:
                getattr(self, k)[...] = new_state[k]
        return y

    def prepare(
        self, x: jax.typing.ArrayLike
    ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
        """``(x, params, state)`` as the core takes them, after flax's dtype promotion."""
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # flax promotes x with every variable first and normalizes the promoted x.
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        return jnp.asarray(x), params, self.running_stats()

    def running_stats(self) -> dict[str, jax.Array]:
        """The running statistics ``{"mean", "var"}`` (and ``"count"``) as the core takes them."""
        state = {"mean": self.mean[...], "var": self.var[...]}
        if self.count is not None:
            state["count"] = self.count[...]
        return state

    def set_view(self, use_running_average: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """Used by ``nnx.view``.

        Args:
          use_running_average: if not None, the new ``use_running_average``.
          **kwargs: other layers' view settings, returned unused (flax 0.12.4 to
            0.12.7 pass every setting to every layer and read back the unused ones).

        Returns:
          ``kwargs``.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
        return kwargs


def _mode(layer: BatchNorm, train: bool) -> Mode:
    """The layer's one mode, passed to :func:`jbn.bn_forward` as ``train``.

    A test-time mode (a prior, ``jbn.nnx.use_stream``'s stream) overrides ``train``;
    ``jbn.nnx.use_accumulation``'s mode replaces training only.
    """
    stream = getattr(layer, "stream", None)
    accumulation = getattr(layer, "accumulation", None)
    return layer_mode(train, layer.prior, layer.prior_form, stream, accumulation)


def _check_features(layer: BatchNorm, x_shape: tuple[int, ...]) -> None:
    checks.features_match(
        x_shape,
        layer.axis,
        layer.mean.shape,
        f"jbn.nnx.BatchNorm(num_features={layer.num_features!r}, axis={layer.axis!r})",
    )


def _store(layer: BatchNorm, new_state: dict[str, jax.Array]) -> None:
    """Writes a training step's running statistics into the layer's variables."""
    for k, v in new_state.items():
        variable = getattr(layer, k)
        if variable.shape == v.shape:
            variable[...] = v
        else:  # a scalar count (an older checkpoint) becomes per feature
            variable.value = v
