"""``jbn.equinox.BatchNorm``, the layer: see :mod:`jbn.equinox`. Needs ``equinox``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from .. import _checks as checks
from .._batch_norm import bn_forward, bn_init
from .._checks import Residual

_EMA_MODES = ("ema", "legacy")


def _default_dtype() -> DTypeLike:
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _names(axis_name: Any) -> tuple[Hashable, ...]:
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def _no_axis_error(axis_name: Any, missing: Hashable) -> NameError:
    return NameError(
        f"jbn.equinox.BatchNorm(axis_name={axis_name!r}) in training mode reduces over the "
        f"named batch axis {missing!r}, which is not bound here. Call the model on one example "
        f"under a vmap (or pmap / shard_map) that names it, e.g. "
        f"jax.vmap(model, axis_name={missing!r}, in_axes=(0, None), out_axes=(0, None))"
        "(x, state); or run inference with bn(x, state, inference=True) or "
        "eqx.nn.inference_mode(model), which needs no named axis"
    )


def _real(
    value: Any, name: str, low: float, *, strict: bool = False, high: float = math.inf
) -> float:
    """A Python float in [low, high] (low excluded when strict), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    value = float(value)
    if not (value > low if strict else value >= low) or not value <= high:
        bounds = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Batch normalization for Equinox, with jbn's exact statistics and analytic backward.

    A drop-in replacement for ``eqx.nn.BatchNorm(..., mode="batch")``: the same
    arguments and call, on one example ``x`` of shape ``(input_size, *spatial)``
    under ``jax.vmap(..., axis_name=...)`` (or ``pmap``, ``shard_map``, or nested
    maps with a tuple ``axis_name``)::

      >>> import equinox as eqx, jax, jbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
      >>> x = jax.random.normal(jax.random.key(0), (8, 3, 5))
      >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)   # batch statistics; updates the running ones
      >>> y, _ = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None))(x, state)

    Training normalizes with the statistics of the batch (over ``spatial`` and the
    named axes), exact and synchronized exactly over the devices; the gradient is
    the analytic batch-norm backward of :func:`jbn.bn_forward`. Inference normalizes
    with the running statistics and needs no named axis.

    The running statistics (in ``state``) are the exponentially weighted average
    of the batch statistics seen, normalized by the total weight: after ``t``
    steps, ``Σ_i m^(t-i) s_i (1 - m) / (1 - m^t)`` for both the mean and the
    (biased) variance, so after one step they equal that batch's. This is
    Equinox's zero-debiasing, which jbn applies to the variance too: Equinox
    starts its hidden variance at 1 and divides it by ``1 - m^t``, which
    overstates the variance by ``m^t / (1 - m^t)`` (+9.4 after 10 steps at
    momentum 0.99, +0.58 after 100); its running mean is the same as jbn's. jbn
    stores the debiased values and a step ``count``; each step updates them with
    :func:`jbn.bn_forward` at momentum ``(m - m^t) / (1 - m^t)``.

    Other differences from ``eqx.nn.BatchNorm``:

    - ``mode`` must be ``"batch"`` (the default): ``"ema"`` and ``"legacy"``
      (Equinox's default, which means ``"ema"``) normalize training batches with
      a running average of past batches, which jbn does not implement; they raise.
    - ``axis_name`` is a static field (a list becomes a tuple), so a model is a
      valid ``jax.jit`` argument and ``eqx.tree_at`` cannot change it.
    - The output has ``x``'s dtype (Equinox promotes ``x`` with the parameters'
      dtype); statistics are computed in float32 (float64 for float64 input).
    - The state is one dict ``{"mean", "var", "count"}`` under one
      ``eqx.nn.StateIndex`` (``bn.state_index``), not Equinox's two entries.
    - Real inputs only (Equinox also accepts complex ones).
    - Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) cannot pass the
      custom backward; use ``autodiff=True`` for it.

    Args:
      input_size: the number of channels, ``x.shape[0]``.
      axis_name: the name of the batch axis (as given to ``jax.vmap``,
        ``jax.pmap`` or ``shard_map``), or a tuple of names to reduce over several.
      eps: added to the variance (default 1e-5).
      channelwise_affine: learn a per-channel ``weight`` (γ) and ``bias`` (β).
      momentum: decay of the running average, ``new = m * old + (1 - m) * batch``
        before debiasing (default 0.99). None: the cumulative average, the plain
        mean of every batch's statistics (torch's ``momentum=None``).
      inference: use the running statistics (True) or the batch's (False, the
        default). Toggled by ``eqx.nn.inference_mode``; overridden per call.
      dtype: dtype of ``weight``, ``bias`` and the running statistics (default
        float32, float64 with ``jax_enable_x64``).
      mode: ``"batch"``; see above.
      finite_running_stats: True (default): a feature whose batch statistics are
        not finite keeps its running statistics; False: update them anyway.
      unbiased_running_var: store the running variance with Bessel's correction
        ``n / (n - 1)``, ``n`` the number of values per channel in the batch
        (torch's convention), while normalizing with the biased batch variance.
      residual: what the backward pass keeps, ``"input"`` (x) or ``"output"`` (y;
        see :func:`jbn.bn_forward`).
      min_scale: smallest |γ| used with ``residual="output"`` (default 1e-3).
      virtual_batch_size: ghost batch norm (Hoffer et al. 2017): in training,
        normalize each group of this many consecutive examples along the named
        axes (``lax.axis_index(axis_name) // virtual_batch_size``) with its own
        statistics; the running statistics follow the groups' count-weighted
        means. Must divide the mapped batch. The layer then works on a ``(G, C,
        *spatial)`` copy of each example, one slice per group (G = batch /
        virtual_batch_size), so its cost grows G-fold.
      renorm: batch renormalization (Ioffe 2017), with bounds ``rmax`` and ``dmax``.
      rmax: renorm's bound on r, >= 1 (default 3.0).
      dmax: renorm's bound on |d|, >= 0 (default 5.0).
      autodiff: differentiate the plain reference with JAX instead of the
        analytic backward (slower; allows forward mode).
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    axis_name: Hashable | tuple[Hashable, ...] = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    mode: Literal["batch"] = eqx.field(static=True)
    unbiased_running_var: bool = eqx.field(static=True)
    finite_running_stats: bool = eqx.field(static=True)
    residual: Residual = eqx.field(static=True)
    min_scale: float = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)
    renorm: bool = eqx.field(static=True)
    rmax: float = eqx.field(static=True)
    dmax: float = eqx.field(static=True)
    autodiff: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: Literal["batch"] = "batch",
        *,
        unbiased_running_var: bool = False,
        finite_running_stats: bool = True,
        residual: Residual = "input",
        min_scale: float = 1e-3,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        rmax: float = 3.0,
        dmax: float = 5.0,
        autodiff: bool = False,
    ) -> None:
        if mode in _EMA_MODES:
            raise ValueError(
                f"jbn.equinox.BatchNorm(mode={mode!r}) is not supported: Equinox's 'ema' mode "
                "(its 'legacy' default) normalizes training batches with a running average of "
                "past batches. jbn normalizes with the batch's own statistics, which is "
                "Equinox's mode='batch': pass mode='batch' (the default). To move an existing "
                "mode='ema' model, use jbn.equinox.convert(model, state, allow_ema=True)"
            )
        if mode != "batch":
            raise ValueError(f"mode must be 'batch', got {mode!r}")
        if isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral):
            raise TypeError(f"input_size must be a positive int, got {input_size!r}")
        if input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size}")
        if isinstance(axis_name, list):
            axis_name = tuple(axis_name)
        if axis_name is None or (isinstance(axis_name, tuple) and not axis_name):
            raise ValueError(
                "axis_name must name the batch axis of the vmap / pmap / shard_map the layer "
                f"runs under (e.g. 'batch'), or a tuple of names; got {axis_name!r}"
            )
        try:
            hash(axis_name)
        except TypeError:
            raise TypeError(
                f"axis_name must be hashable (a name or a tuple of names), got {axis_name!r}"
            ) from None
        eps = _real(eps, "eps", 0.0, strict=True)
        if momentum is not None:
            momentum = _real(momentum, "momentum", 0.0, high=1.0)
        for value, name in (
            (channelwise_affine, "channelwise_affine"),
            (inference, "inference"),
            (unbiased_running_var, "unbiased_running_var"),
            (finite_running_stats, "finite_running_stats"),
            (renorm, "renorm"),
            (autodiff, "autodiff"),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a Python bool, got {value!r}")
        if residual not in ("input", "output"):
            raise ValueError(f"residual must be 'input' or 'output', got {residual!r}")
        min_scale = _real(min_scale, "min_scale", 0.0, strict=True)
        rmax = _real(rmax, "rmax", 1.0)
        dmax = _real(dmax, "dmax", 0.0)
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, numbers.Integral)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}"
            )
        dtype = _default_dtype() if dtype is None else dtype
        params, state = bn_init(input_size, dtype=dtype, cumulative=True)
        if channelwise_affine:
            self.weight, self.bias = params["scale"], params["bias"]
        else:
            self.weight = self.bias = None
        self.state_index = eqx.nn.StateIndex(state)
        self.inference = inference
        self.axis_name = axis_name
        self.input_size = int(input_size)
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.unbiased_running_var = unbiased_running_var
        self.finite_running_stats = finite_running_stats
        self.residual = residual
        self.min_scale = min_scale
        self.virtual_batch_size = virtual_batch_size
        self.renorm = renorm
        self.rmax = rmax
        self.dmax = dmax
        self.autodiff = autodiff

    def __call__(
        self,
        x: ArrayLike,
        state: eqx.nn.State,
        *,
        key: Any = None,
        inference: bool | None = None,
        mask: ArrayLike | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes one example.

        Args:
          x: one example, shape ``(input_size, *spatial)``, floating point.
          state: the ``eqx.nn.State`` holding the running statistics.
          key: ignored (Equinox's layer signature).
          inference: overrides ``self.inference`` when not None.
          mask: optional boolean array broadcastable to ``x``; False entries (e.g. a
            padding example: ``mask=False``) are left out of the statistics, the
            running update and the statistics' gradient.

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape and dtype, and the state with the
          updated running statistics (unchanged in inference).

        Raises:
          NameError: in training, when a name of ``axis_name`` is not bound by an
            enclosing vmap, pmap or shard_map.
        """
        del key
        inference = self.inference if inference is None else inference
        if not isinstance(inference, (bool, jnp.bool_)):
            raise TypeError(
                f"inference must be a Python bool or None, got {type(inference).__name__}; "
                "under jax.jit keep the model's flags static (eqx.filter_jit does)"
            )
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[0] != self.input_size:
            raise ValueError(
                f"x has shape {x.shape}, but jbn.equinox.BatchNorm(input_size="
                f"{self.input_size}) takes one example of shape ({self.input_size}, *spatial); "
                "map it over the batch with jax.vmap(..., axis_name=...)"
            )
        if not inference:
            for name in _names(self.axis_name):
                try:
                    lax.axis_size(name)
                except NameError:
                    raise _no_axis_error(self.axis_name, name) from None
        if mask is not None:
            mask = checks.mask(mask, x.shape)
        squeeze = x.ndim == 1
        if squeeze:  # bn_forward needs an axis to reduce: a spatial axis of size 1
            x = x[:, None]
            mask = None if mask is None else mask[:, None]
        params = {"scale": self.weight, "bias": self.bias} if self.channelwise_affine else None
        running = state.get(self.state_index)
        count = running["count"]
        if inference or self.momentum is None or self.momentum == 1.0:
            momentum = self.momentum
        else:
            # Debiased average: momentum (m - m^t) / (1 - m^t) at step t (0 at t = 1).
            m = jnp.asarray(self.momentum, running["mean"].dtype)
            m_t = m ** (count + 1).astype(m.dtype)
            momentum = (m - m_t) / (1.0 - m_t)
        options: dict[str, Any] = dict(
            epsilon=self.eps,
            unbiased_running_var=self.unbiased_running_var,
            finite_running_stats=self.finite_running_stats,
            residual=self.residual,
            min_scale=self.min_scale,
            autodiff=self.autodiff,
            renorm=self.renorm,
            rmax=self.rmax,
            dmax=self.dmax,
        )
        if inference or self.virtual_batch_size is None:
            y, new = bn_forward(
                params,
                running,
                x,
                not inference,
                axis=0,
                momentum=momentum,
                mask=mask,
                axis_name=None if inference else self.axis_name,
                **options,
            )
        else:
            y, new = self._ghost(params, running, x, momentum, mask, options)
        if squeeze:
            y = y[:, 0]
        if not inference:
            if self.momentum is not None:  # bn_forward counts the cumulative steps itself
                new["count"] = count + 1
            state = state.set(self.state_index, new)
        return y, state

    def _ghost(
        self,
        params: dict[str, jax.Array | None] | None,
        running: dict[str, jax.Array],
        x: jax.Array,
        momentum: ArrayLike | None,
        mask: jax.Array | None,
        options: dict[str, Any],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training with ghost batches: one bn_forward over G masked copies of the example.

        The group becomes a leading feature axis: copy g of the example counts
        (mask) only in group g's statistics, so bn_forward normalizes each group
        with its own, and this example keeps the slice of its own group.
        """
        vbs = self.virtual_batch_size
        assert vbs is not None  # __call__ takes this path only with ghost batches
        size = math.prod(lax.axis_size(name) for name in _names(self.axis_name))
        groups, rest = divmod(size, vbs)
        if rest:
            raise ValueError(
                f"virtual_batch_size={vbs} does not divide the batch: the named axes "
                f"{self.axis_name!r} map {size} examples"
            )
        per_example = math.prod(x.shape[1:])
        if vbs * per_example <= 1:
            raise ValueError(
                f"Expected more than 1 value per feature when training: ghost batches of "
                f"virtual_batch_size={vbs} examples of shape {x.shape} have {vbs * per_example}"
            )
        group = lax.axis_index(self.axis_name) // vbs
        mine = jnp.arange(groups) == group
        copies = jnp.broadcast_to(x, (groups, *x.shape))
        in_group = jnp.broadcast_to(mine.reshape((groups,) + (1,) * x.ndim), copies.shape)
        if mask is not None:
            in_group = in_group & jnp.broadcast_to(mask, copies.shape)
        if params is not None:
            params = {
                k: jnp.broadcast_to(v, (groups, *v.shape))
                for k, v in params.items()
                if v is not None  # a None entry is no parameter, as a missing one
            }
        stats = {k: v for k, v in running.items() if k != "count" or momentum is None}
        stats.update(
            {k: jnp.broadcast_to(running[k], (groups, *running[k].shape)) for k in ("mean", "var")}
        )
        ys, new = bn_forward(
            params,
            stats,
            copies,
            True,
            axis=(0, 1),
            momentum=momentum,
            mask=in_group,
            axis_name=self.axis_name,
            **options,
        )
        # Running statistics: the groups' updates, weighted by their counts.
        counts = lax.psum(jnp.sum(in_group, axis=tuple(range(2, copies.ndim))), self.axis_name)
        total = jnp.sum(counts, axis=0, keepdims=True)
        weight = counts / jnp.maximum(total, 1)
        seen = total[0] > 0
        for k in ("mean", "var"):
            average = jnp.sum(weight * new[k], axis=0).astype(running[k].dtype)
            new[k] = jnp.where(seen, average, running[k])
        new["count"] = new.get("count", running["count"])
        return lax.dynamic_index_in_dim(ys, group, 0, keepdims=False), new


# --------------------------------------------------------------------------- #
# Conversion of a model's eqx.nn.BatchNorm layers.
# --------------------------------------------------------------------------- #
