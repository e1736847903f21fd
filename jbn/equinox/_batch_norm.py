"""``jbn.equinox.BatchNorm``, the layer: see :mod:`jbn.equinox`. Needs ``equinox``."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from .. import _checks as checks
from .. import _options as options
from .._accumulate import ACCUMULATOR, Accumulate
from .._batch_norm import bn_forward, bn_init
from .._checks import PriorForm, Residual
from .._modes import layer_mode
from .._relay import Link, linked
from .._stream import MEMORY, Stream
from ._layer import Layer, Output

_EMA_MODES = ("ema", "legacy")
_STATIC_FLAGS = "; under jax.jit keep the model's flags static (eqx.filter_jit does)"


def _default_dtype() -> Any:
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _check_mode(mode: Any) -> None:
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


def _check_bound(axis_name: Hashable | tuple[Hashable, ...]) -> None:
    """Training reduces over the named axes: each must be bound by a vmap, pmap or shard_map."""
    for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
        try:
            lax.axis_size(name)
        except NameError:
            raise NameError(
                f"jbn.equinox.BatchNorm(axis_name={axis_name!r}) in training mode reduces over "
                f"the named batch axis {name!r}, which is not bound here. Call the model on one "
                f"example under a vmap (or pmap / shard_map) that names it, e.g. "
                f"jax.vmap(model, axis_name={name!r}, in_axes=(0, None), out_axes=(0, None))"
                "(x, state); or run inference with bn(x, state, inference=True) or "
                "eqx.nn.inference_mode(model), which needs no named axis"
            ) from None


def _check_batch(shape: tuple[int, ...], axis_name: Any, input_size: int) -> None:
    """Training needs more than one value per channel: over the batch and the spatial axes."""
    examples = 1
    for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
        examples *= lax.axis_size(name)
    spatial = math.prod(shape[1:])
    if examples * spatial > 1:
        return
    raise ValueError(
        f"jbn.equinox.BatchNorm(input_size={input_size}) in training needs more than 1 value "
        f"per feature (channel), but got a batch of {examples} example(s) of shape {shape} over "
        f"axis_name={axis_name!r}: train on a batch of at least 2 examples, or run inference "
        "(inference=True or eqx.nn.inference_mode) on a single example"
    )


@options.document
class BatchNorm(Layer):
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

    The running statistics (in ``state``) are Equinox's zero-debiased average,
    ``Σ_i m^(t-i) s_i (1 - m) / (1 - m^t)`` after ``t`` steps, for the mean and
    the variance alike (:func:`jbn.bn_forward` with ``debias=True``). Equinox's
    hidden variance starts at 1, which overstates its variance by ``m^t / (1 -
    m^t)`` (+9.4 after 10 steps at momentum 0.99); its mean is the same. The
    state is one dict under ``bn.state_index``: ``mean``, ``var``, the step
    ``count`` and each channel's ``feature_count`` (the steps it counted: a
    channel with non-finite or fully masked batch statistics keeps its
    statistics and count, so the initial 0 and 1 never enter the average).

    Other differences from ``eqx.nn.BatchNorm``: ``mode`` must be ``"batch"``
    (``"ema"`` and ``"legacy"`` raise); ``axis_name`` is a static field (a list
    becomes a tuple); the output has ``x``'s dtype, with float32 statistics
    (float64 for float64 input); real inputs only; forward-mode differentiation
    needs ``autodiff=True``. Ghost batches group consecutive examples along the
    named axes (``lax.axis_index(axis_name) // virtual_batch_size``), on a
    ``(G, C, *spatial)`` copy of each example, so their cost grows G-fold.

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
      <jbn options>
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
    prior: float | None = eqx.field(static=True)
    prior_form: PriorForm = eqx.field(static=True)
    stream: Stream | None = eqx.field(static=True)  # set by jbn.equinox.use_stream
    stream_link: Link | None = eqx.field(static=True)  # its place on the model's relay, likewise
    accumulation: Accumulate | None = eqx.field(static=True)  # jbn.equinox.use_accumulation

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
        prior: float | None = None,
        prior_form: PriorForm = "pooled",
    ) -> None:
        _check_mode(mode)
        given = locals()
        for name, value in options.check_all({k: given[k] for k in options.JBN}).items():
            setattr(self, name, value)
        self.input_size = checks.positive_int(input_size, "input_size", allow_none=False)
        self.axis_name = checks.named_axes(axis_name)
        self.eps = checks.positive_float(eps, "eps")
        checks.momentum(momentum)
        self.momentum = None if momentum is None else float(momentum)
        self.channelwise_affine = checks.python_bool(channelwise_affine, "channelwise_affine")
        self.inference = checks.python_bool(inference, "inference")
        self.autodiff = checks.python_bool(autodiff, "autodiff")
        self.mode = mode
        self.stream = None
        self.stream_link = None
        self.accumulation = None
        dtype = _default_dtype() if dtype is None else dtype
        params, state = bn_init(input_size, dtype=dtype, cumulative=True)
        self.weight, self.bias = (
            (params["scale"], params["bias"]) if channelwise_affine else (None, None)
        )
        # "count": the training steps (Equinox's batch counter); "feature_count": the
        # steps each channel counted, which the debiased average runs on.
        state = {**state, "count": jnp.zeros((), jnp.int32), "feature_count": state["count"]}
        self.state_index = eqx.nn.StateIndex(state)

    __call__ = Layer.__call__  # Equinox's batch-norm call, written once for jbn's layers

    def _forward(self, x: ArrayLike, state: eqx.nn.State, inference: Any, mask: Any) -> Output:
        """One example in the layer's mode: the call, ``key`` aside."""
        inference = self.inference if inference is None else inference
        checks.python_bool(inference, "inference", _STATIC_FLAGS)
        x = jnp.asarray(x)
        _check_example(x.shape, self.input_size)
        # A test-time mode (a prior, a stream) pools the named axes' batch, whatever inference
        # says; the accumulation mode (jbn.equinox.use_accumulation) replaces training only.
        mode = layer_mode(
            not inference, self.prior, self.prior_form, self.stream, self.accumulation
        )
        if mode is not False:
            _check_bound(self.axis_name)
        _check_params(self.weight, self.bias, self.input_size)
        mask = checks.mask(mask, x.shape)
        if mode is True or isinstance(mode, Accumulate):
            _check_batch(x.shape, self.axis_name, self.input_size)
        squeeze = x.ndim == 1
        if squeeze:  # bn_forward needs an axis to reduce: a spatial axis of size 1
            x = x[:, None]
            mask = None if mask is None else mask[:, None]
        params = {"scale": self.weight, "bias": self.bias} if self.channelwise_affine else None
        stored = state.get(self.state_index)
        # A state without "feature_count" (made before it existed) starts from the step count.
        running = {k: stored[k] for k in ("mean", "var")}
        running["count"] = stored.get("feature_count", stored["count"])
        # jbn.equinox.use_stream's memory, jbn.equinox.use_accumulation's accumulator.
        running |= {k: stored[k] for k in (*MEMORY, *ACCUMULATOR) if k in stored}
        with linked(self.stream_link):
            y, new = bn_forward(
                params,
                running,
                x,
                mode,
                axis=0,
                momentum=self.momentum,
                epsilon=self.eps,
                mask=mask,
                axis_name=None if mode is False else self.axis_name,
                autodiff=self.autodiff,
                debias=self.momentum is not None,
                **{**options.jbn_kwargs(self), "prior": None},  # the prior is in the mode
            )
        if squeeze:
            y = y[:, 0]
        if isinstance(mode, Accumulate):
            state = state.set(self.state_index, {**stored, **{k: new[k] for k in ACCUMULATOR}})
        elif mode is True or isinstance(mode, Stream):
            state = state.set(self.state_index, _stored(stored, new, training=mode is True))
        return y, state


def _check_example(shape: tuple[int, ...], input_size: int) -> None:
    if len(shape) < 1 or shape[0] != input_size:
        raise ValueError(
            f"x has shape {shape}, but jbn.equinox.BatchNorm(input_size={input_size}) takes one "
            f"example of shape ({input_size}, *spatial); map it over the batch with "
            "jax.vmap(..., axis_name=...)"
        )


def _check_params(weight: Any, bias: Any, input_size: int) -> None:
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and jnp.shape(value) != (input_size,):
            raise ValueError(
                f"jbn.equinox.BatchNorm(input_size={input_size}) has a {name} of shape "
                f"{jnp.shape(value)}; it must have shape ({input_size},)"
            )


def _stored(stored: dict[str, Any], new: dict[str, Any], training: bool) -> dict[str, Any]:
    """The layer's new state entry: the stream's memory, or a training step's statistics."""
    memory = {k: new[k] for k in MEMORY if k in new}
    if not training:
        return {**stored, **memory}
    return (
        {"mean": new["mean"], "var": new["var"], "count": stored["count"] + 1}
        | {k: stored[k] for k in (*MEMORY, *ACCUMULATOR) if k in stored}
        | ({"feature_count": new["count"]} if "feature_count" in stored else {})
    )
