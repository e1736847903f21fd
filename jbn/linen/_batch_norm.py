"""``jbn.linen``: ``BatchNorm``, a drop-in replacement for ``flax.linen.BatchNorm`` on the jbn core.

``jbn.BatchNorm`` is the same class.

The module only fetches variables, calls :func:`jbn.bn_forward` and stores what
it returns; all the math is in the core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes, initializers
from flax.typing import Dtype, Initializer

from .. import _checks as checks
from .. import _options as options
from .._batch_norm import bn_forward
from .._checks import PriorForm, Residual
from .._modes import layer_mode


@options.document
class BatchNorm(nn.Module):
    """Batch normalization for Flax linen, with jbn's analytic backward pass.

    A drop-in replacement for :class:`flax.linen.BatchNorm`: the same fields,
    call signature and variables (``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var``, same shapes and dtypes), so
    checkpoints move between the two. Train with ``use_running_average=False`` and
    ``mutable=["batch_stats"]``::

      >>> import jax, jax.numpy as jnp, jbn
      >>> bn = jbn.BatchNorm(momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (8, 4))
      >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
      >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      >>> y = bn.apply({**variables, **updates}, x, use_running_average=True)

    Differences from flax: the statistics are always exact (shifted sums, at
    least float32), so ``use_fast_variance`` is accepted and ignored;
    ``force_float32_reductions=False`` only keeps flax's dtype of the running
    statistics (``param_dtype``), the reductions stay float32. During
    initialization the running statistics are not updated, and a training-mode
    init normalizes with the init batch's own statistics (plain batch norm: no
    ghost batches, no renormalization, no ``axis_name``), or with the initial
    running statistics when that batch has a single value per feature, so a
    dummy batch of one example works.

    Attributes:
      use_running_average: True: normalize with the running statistics
        (evaluation); False: with the batch's (training). Set here or in
        ``__call__``, not both.
      axis: the feature axis or axes (default -1).
      momentum: running-average decay, ``new = momentum * old + (1 - momentum) *
        batch`` (default 0.99). None: cumulative average of all batches so far,
        which adds an int32 ``batch_stats/count`` variable (per feature: the
        batches each feature counted).
      epsilon: added to the variance (default 1e-5).
      dtype: output dtype (default: ``x`` promoted with the parameters, as flax).
      param_dtype: dtype of ``scale`` and ``bias`` (default float32).
      use_bias: learn ``bias`` (β).
      use_scale: learn ``scale`` (γ).
      bias_init: initializer of ``bias`` (default zeros).
      scale_init: initializer of ``scale`` (default ones).
      axis_name: named axis (pmap, shard_map) whose devices share statistics.
      axis_index_groups: groups of devices along ``axis_name``.
      use_fast_variance: accepted for compatibility; jbn is always exact.
      force_float32_reductions: True (default): float32 running statistics;
        False: ``param_dtype`` running statistics (reductions stay float32).
      <jbn options>
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased_running_var: bool = False
    finite_running_stats: bool = True
    residual: Residual = "input"
    min_scale: float = 1e-3
    virtual_batch_size: int | None = None
    renorm: bool = False
    rmax: float = 3.0
    dmax: float = 5.0
    prior: float | None = None
    prior_form: PriorForm = "pooled"

    def setup(self) -> None:
        """Checks every setting once, when the module is bound (flax's setup)."""
        checks.momentum(self.momentum)
        checks.positive_float(self.epsilon, "epsilon")
        checks.axis_index_groups(self.axis_index_groups, checks.axis_name(self.axis_name))
        options.check_module(self)

    @nn.compact
    def __call__(
        self,
        x: jax.typing.ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: jax.typing.ArrayLike | None = None,
        rmax: float | jax.typing.ArrayLike | None = None,
        dmax: float | jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; in training mode also updates ``batch_stats``.

        Args:
          x: input, e.g. (N, C) or (N, H, W, C).
          use_running_average: overrides nothing: give it here or as the field.
          mask: boolean, broadcastable to ``x``; only True entries enter the
            statistics.
          rmax: renorm's bound on r for this call (default: the field).
          dmax: renorm's bound on |d| for this call (default: the field).

        Returns:
          The normalized ``x``, same shape.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        given, x = x, checks.input_array(x)  # an integer x computes in float32, as in flax
        axes = checks.feature_axes(self.axis, x.shape)
        feature_shape = tuple(x.shape[a] for a in axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        names = ("mean", "var") if self.momentum is not None else ("mean", "var", "count")
        inits = {
            "mean": lambda: jnp.zeros(feature_shape, stats_dtype),
            "var": lambda: jnp.ones(feature_shape, stats_dtype),
            "count": lambda: jnp.zeros(feature_shape, jnp.int32),
        }
        running = {k: self.variable("batch_stats", k, inits[k]) for k in names}
        checks.features_match(
            x.shape, self.axis, running["mean"].value.shape, f"jbn.BatchNorm(axis={self.axis!r})"
        )
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        # flax's output dtype: the given x promoted with the parameters.
        dtype = dtypes.canonicalize_dtype(jnp.asarray(given), *params.values(), dtype=self.dtype)
        # A prior selects test-time adaptation: evaluation with pooled statistics.
        mode = layer_mode(not use_running_average, self.prior, self.prior_form, None)
        state = {k: v.value for k, v in running.items()}

        if self.is_initializing():
            # Plain batch norm on the init batch, no update; a one-example dummy
            # batch normalizes with the initial running statistics.
            values = x.size // math.prod(feature_shape)
            kwargs = {k: getattr(self, k) for k in ("axis", "momentum", "epsilon")}
            kwargs.update(residual=self.residual, min_scale=self.min_scale)
            y, _ = bn_forward(
                params, state, x, mode is True and values > 1, mask=mask, dtype=dtype, **kwargs
            )
            return y

        if mode is True and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                "jbn.BatchNorm in training mode (use_running_average=False) updates its running "
                "statistics: pass mutable=['batch_stats'] to apply, e.g. `y, updates = "
                "model.apply(variables, x, mutable=['batch_stats'])`, then "
                "`variables = {**variables, **updates}`; for evaluation use "
                "use_running_average=True"
            )
        kwargs = options.forward_kwargs(self, rmax=rmax, dmax=dmax)
        y, new_state = bn_forward(
            params, state, x, mode, mask=mask, dtype=dtype, **{**kwargs, "prior": None}
        )
        if mode is True:
            for k, variable in running.items():
                variable.value = new_state[k]
        return y
