"""The functional API: ``bn_init``, ``bn_forward``, ``bn_stats``.

These functions check their arguments (``_checks``), then plumb the pieces: the
statistics (``_stats``), the training-mode custom_vjp (``_train``), ghost
batches and renormalization (``_variants``) and the running-average update
(``_running``). The evaluation-mode affine map is written here once, and
folding (``_fold``) uses it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from . import _accumulate as accumulation
from . import _checks as checks
from . import _modes as modes
from . import _options as options
from . import _stream as stream_mode
from ._accumulate import Accumulate
from ._checks import PriorForm, Residual
from ._prior import Prior, prior_forward
from ._running import update_running
from ._stats import StatsConfig, batch_stats, broadcast_shape, compute_dtype, real_dtype
from ._stream import Stream
from ._train import TrainConfig, bn_train, bn_train_reference
from ._variants import renorm_affine, split_ghost_batches, split_named_ghost_batches

Array = jax.Array
# A missing or None entry means no scale (bias); None means neither.
Params = Mapping[str, ArrayLike | None] | None
State = Mapping[str, ArrayLike]


def eval_multiplier(scale: Array, var: Array, epsilon: float) -> Array:
    """The evaluation-mode multiplier a = γ / √(var + ε) of y = (x - μ) a + β."""
    return scale * lax.rsqrt(var + epsilon)


def eval_affine(x: Array, mean: Array, multiplier: Array, bias: Array) -> Array:
    """The evaluation-mode map y = (x - μ) a + β (x - μ first: exact when |μ| >> std)."""
    return (x - mean) * multiplier + bias


def _stats_config(
    x: Array, axis: Any, axis_name: Any, axis_index_groups: Any
) -> tuple[StatsConfig, tuple[int, ...]]:
    axes = checks.feature_axes(axis, x.shape)
    axis_name = checks.axis_name(axis_name)
    cfg = StatsConfig(
        reduce_axes=tuple(a for a in range(x.ndim) if a not in axes),
        axis_name=axis_name,
        axis_index_groups=checks.axis_index_groups(axis_index_groups, axis_name),
    )
    return cfg, axes


def _train_config(
    x: Array,
    stats: StatsConfig,
    *,
    epsilon: float,
    residual: Residual,
    min_scale: float,
    dtype: DTypeLike | None,
) -> TrainConfig:
    residual = checks.residual(residual)
    out_dtype = checks.floating_dtype(dtype, allow_none=True, allow_complex=jnp.iscomplexobj(x))
    return TrainConfig(
        stats=stats,
        epsilon=checks.static_float(epsilon, "epsilon", positive=True),
        residual=residual,
        min_scale=checks.static_float(min_scale, "min_scale", positive=True),
        x_dtype=jnp.dtype(x.dtype),
        out_dtype=jnp.dtype(x.dtype if out_dtype is None else out_dtype),
    )


def bn_init(
    feature_shape: int | Sequence[int],
    *,
    dtype: DTypeLike = jnp.float32,
    cumulative: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Creates batch-norm parameters and running statistics.

    The names and shapes are those of ``flax.linen.BatchNorm``'s ``params`` and
    ``batch_stats`` collections, so variables move between the two.

    Args:
      feature_shape: the sizes of the feature axes of ``x``, in axis order; e.g.
        ``C`` for (N, C), NHWC or NCHW input, ``(H, W, C)`` for per-activation
        batch norm of NHWC input with ``axis=(1, 2, 3)``.
      dtype: dtype of the parameters and statistics (default float32).
      cumulative: also create ``state["count"]`` (int32, of the feature shape), the
        number of batches each feature has counted, which ``bn_forward(...,
        momentum=None)`` and ``debias=True`` need.

    Returns:
      ``(params, state)``: ``params = {"scale": ones, "bias": zeros}`` and
      ``state = {"mean": zeros, "var": ones}`` (plus ``"count": 0``).
    """
    shape = checks.feature_shape(feature_shape)
    dtype = checks.floating_dtype(dtype)
    params = {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}
    state = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}
    if cumulative:
        state["count"] = jnp.zeros(shape, jnp.int32)
    return params, state


def bn_stats(
    x: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[Array, Array, Array]:
    """Batch statistics of ``x``: exact per-feature mean, biased variance and count.

    The statistics :func:`bn_forward` normalizes with in training mode: shifted
    sums (no ``E[x²] - E[x]²`` cancellation), in float32 (or float64 for float64
    input; complex inputs have a complex mean and a real variance). Useful to
    recalibrate or inspect a network.

    Args:
      x: input array: floating point; an integer or bool ``x`` is promoted to float32
        (flax's rule).
      axis: the feature axis or axes; every other axis is reduced.
      mask: optional boolean array broadcastable to ``x``; only True entries count.
      axis_name: optional named axis (pmap, shard_map, vmap) to sum over.
      axis_index_groups: optional groups of devices of ``axis_name`` (pmap only).

    Returns:
      ``(mean, var, count)``, each of the feature shape; ``count`` is the number of
      entries per feature (over all devices of ``axis_name``). Carries no gradient.
    """
    x = checks.input_array(x)
    cfg, axes = _stats_config(x, axis, axis_name, axis_index_groups)
    mask = checks.mask(mask, x.shape)
    checks.axis_size(cfg.axis_name)
    checks.batch_not_empty(x.shape, cfg.reduce_axes, cfg.axis_name, "bn_stats")
    feature_shape = tuple(x.shape[a] for a in axes)
    mean, var, n = batch_stats(lax.stop_gradient(x), mask, cfg)
    return mean.reshape(feature_shape), var.reshape(feature_shape), n.reshape(feature_shape)


@options.document
def bn_forward(
    params: Params,
    state: State,
    x: ArrayLike,
    train: bool | Prior | Stream | Accumulate,
    *,
    axis: int | Sequence[int] = -1,
    momentum: float | ArrayLike | None = 0.99,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    unbiased_running_var: bool = False,
    finite_running_stats: bool = True,
    residual: Residual = "input",
    min_scale: float = 1e-3,
    dtype: DTypeLike | None = None,
    autodiff: bool = False,
    debias: bool = False,
    virtual_batch_size: int | None = None,
    renorm: bool = False,
    rmax: float | ArrayLike = 3.0,
    dmax: float | ArrayLike = 5.0,
    prior: float | None = None,
    prior_form: PriorForm = "pooled",
) -> tuple[Array, dict[str, Array]]:
    """Batch normalization: y = scale * (x - mean) / sqrt(var + epsilon) + bias.

    In training mode (``train=True``) the mean and biased variance are those of
    the batch, per feature, over every axis of ``x`` except ``axis`` (and over the
    devices of ``axis_name``); the running statistics are updated from them. In
    evaluation mode the running statistics are used and ``state`` is returned as
    is. ``train`` may also be a test-time mode, which carries its settings:
    ``jbn.Prior(N)`` normalizes with the running statistics, counted as N
    examples, pooled with the batch's own (the same as ``train=False,
    prior=N``), and ``jbn.Stream(horizon, prior)`` normalizes each example with
    its own statistics pooled with a memory of the stream's, the memory returned
    updated in the new state (see :class:`jbn.Stream`). ``jbn.Accumulate()`` is training
    on a micro-batch that leaves the running statistics alone and adds the
    micro-batch's statistics to an accumulator in the state, for
    :func:`jbn.bn_commit` to apply as one update (see :class:`jbn.Accumulate`).
    Statistics and arithmetic are float32 (float64 for float64 input); the
    output has ``x``'s dtype unless ``dtype`` says otherwise.

    The training-mode gradient is the analytic batch-norm backward (a
    ``jax.custom_vjp``), which keeps only ``x`` (or, with ``residual="output"``,
    only ``y``) plus per-feature vectors. Reverse mode of any order works, and so
    does forward mode over it (``jax.hessian``, ``jax.jacfwd(jax.grad(f))``);
    forward mode straight through the layer (``jax.jvp``, ``jax.jacfwd``) cannot
    pass a custom_vjp, so use ``autodiff=True`` there. The running statistics
    carry no gradient.

    Args:
      params: ``{"scale": γ, "bias": β}`` of the feature shape, either may be
        missing, or None for no affine part.
      state: ``{"mean", "var"}`` running statistics of the feature shape, plus
        ``"count"`` for ``momentum=None`` or ``debias`` (see :func:`bn_init`): the
        number of batches each feature counted (a feature whose update is skipped
        keeps its count). A scalar count (an older checkpoint) is broadcast, and
        the new state's count has the feature shape.
      x: input, e.g. (N, C), (N, H, W, C), (N, C, H, W) or (N, T, C): floating point or
        complex; an integer or bool ``x`` is promoted to float32, as flax does (the
        output is then float32 unless ``dtype`` says otherwise).
      train: the mode: a Python bool, batch statistics (True) or running
        statistics (False); or ``jbn.Prior(N)``, ``jbn.Stream(horizon, prior)``
        or ``jbn.Accumulate()``.
      axis: feature axis or axes (default -1). ``axis=1`` for NCHW; ``axis=(1, 2, 3)``
        for one mean per pixel and channel of NHWC input.
      momentum: running-average decay as in flax, ``new = momentum * old + (1 -
        momentum) * batch`` (torch's ``momentum`` is ``1 -`` this). None: cumulative
        average, the exact mean of all batch statistics so far (torch's
        ``momentum=None``); needs ``state["count"]``. Like torch, this averages
        the batch variances, which is not the variance of all the data seen: for
        exact population statistics use ``jbn.recalibrate_batch_stats``.
      epsilon: added to the variance, > 0.
      mask: boolean array broadcastable to ``x``; False entries (padding) are left
        out of the statistics, the running update, the gradient and the sync.
      axis_name: named mapped axis (pmap, shard_map, vmap) whose devices share the
        statistics: each device's exact (count, mean, M2) enters one psum as sums
        about a shift common to all devices (the running mean, under shard_map), so
        the traffic does not grow with the device count and unequal counts are
        exact; a second psum runs only when that shift is far from the batch mean.
      axis_index_groups: groups of devices along ``axis_name`` (pmap only).
      dtype: output dtype (default: ``x``'s dtype).
      autodiff: use the plain two-pass reference and JAX's own differentiation
        instead of the custom_vjp: slower, keeps more memory, but allows forward
        mode.
      debias: Equinox's zero-debiased running average: a feature's t-th update
        uses the decay (m - m^t) / (1 - m^t) for ``momentum`` m (0 at t = 1), so
        the running statistics are Σ m^(t-i) s_i (1 - m) / (1 - m^t) over the
        batches that feature counted, with no weight on the initial mean 0 and
        variance 1. Counts in ``state["count"]``, like ``momentum=None``.
      <jbn options>

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape, and the updated running
      statistics (``state`` itself in evaluation and ``jbn.Prior``; with the
      updated memory in ``jbn.Stream``, the updated accumulator in
      ``jbn.Accumulate``). A memory or accumulator in ``state`` that the mode
      does not use is returned as it is.
    """
    x = checks.input_array(x)
    mode = modes.resolve(train, prior, prior_form)
    accumulating = isinstance(mode, Accumulate)
    train = mode is True or accumulating
    checks.momentum(momentum)
    given = locals()
    jbn_options = options.check_all({name: given[name] for name in options.JBN})
    residual, renorm = jbn_options["residual"], jbn_options["renorm"]
    stats_cfg, axes = _stats_config(x, axis, axis_name, axis_index_groups)
    cfg = _train_config(
        x, stats_cfg, epsilon=epsilon, residual=residual, min_scale=min_scale, dtype=dtype
    )
    feature_shape = tuple(x.shape[a] for a in axes)
    bshape = broadcast_shape(x.shape, stats_cfg.reduce_axes)
    needs = f"x of shape {x.shape} with feature axes {axes}"
    scale, bias = checks.params(params, feature_shape, needs)
    debias = checks.python_bool(debias, "debias")
    need_count = mode is True and (momentum is None or debias)
    state, memory = stream_mode.split_memory(state)
    state, accumulator = accumulation.split_accumulator(state)
    state = checks.state(state, feature_shape, needs, need_count=need_count)
    memory = stream_mode.check_memory(memory, feature_shape, needs)
    accumulator = accumulation.check_accumulator(accumulator, feature_shape, needs)
    if accumulating and (virtual_batch_size is not None or renorm):
        raise ValueError(
            "train=jbn.Accumulate() normalizes each micro-batch with its own statistics: "
            "virtual_batch_size and renorm are for train=True only (the micro-batch already is "
            f"the ghost batch), got virtual_batch_size={virtual_batch_size!r}, renorm={renorm!r}"
        )
    mask = checks.mask(mask, x.shape)
    virtual_batch_size = checks.virtual_batch_size(virtual_batch_size, axes, stats_cfg.axis_name)
    cd = compute_dtype(x.dtype)
    rd = real_dtype(cd)
    # Complex inputs take the plain reference, differentiated by JAX (documented).
    autodiff = checks.python_bool(autodiff, "autodiff") or jnp.iscomplexobj(x)
    scale = jnp.ones(bshape, rd) if scale is None else scale.reshape(bshape)
    bias = jnp.zeros(bshape, rd) if bias is None else bias.reshape(bshape)

    if isinstance(mode, (Prior, Stream)):
        checks.axis_size(stats_cfg.axis_name)
        checks.batch_not_empty(x.shape, stats_cfg.reduce_axes, stats_cfg.axis_name, "bn_forward")
    if isinstance(mode, Prior):
        running = (state["mean"].reshape(bshape), state["var"].reshape(bshape))
        n = jnp.asarray(mode.n, jnp.float32)  # checked by Prior
        y, _ = prior_forward(x, scale, bias, mask, running, n, cfg, mode.form)
        return y, {**state, **memory, **accumulator}
    if isinstance(mode, Stream):
        if not memory:
            memory = stream_mode.start_memory(state["mean"], state["var"], mode)
        y, memory = stream_mode.stream_forward(
            x, scale, bias, mask, memory, (state["mean"], state["var"]), mode, cfg
        )
        return y, {**state, **memory, **accumulator}

    if not train:
        mean = lax.stop_gradient(state["mean"]).astype(cd).reshape(bshape)
        var = lax.stop_gradient(state["var"]).astype(rd).reshape(bshape)
        a = eval_multiplier(scale.astype(rd), var, cfg.epsilon)
        y = eval_affine(x.astype(cd), mean, a, bias.astype(rd))
        return y.astype(cfg.out_dtype), {**state, **memory, **accumulator}

    values = math.prod(x.shape[a] for a in stats_cfg.reduce_axes)
    values *= checks.axis_size(stats_cfg.axis_name)
    x_shape = x.shape
    group = None
    if virtual_batch_size is not None and stats_cfg.axis_name is not None:
        x, scale, bias, mask, cfg, group = split_named_ghost_batches(
            x, scale, bias, mask, cfg, virtual_batch_size
        )
        values = values // x.shape[0]
    elif virtual_batch_size is not None:
        x, scale, bias, mask, cfg = split_ghost_batches(
            x, scale, bias, mask, cfg, virtual_batch_size
        )
        values //= x.shape[0]
    checks.values_per_feature(values, x.shape, axes, virtual_batch_size)
    if renorm:
        lead = (1,) * (x.ndim - len(bshape))
        running = {k: state[k].reshape(lead + bshape) for k in ("mean", "var")}
        scale, bias = renorm_affine(x, scale, bias, mask, running, cfg, rmax, dmax)
    train_fn = bn_train_reference if autodiff else bn_train
    # The running mean: with axis_name, the statistics are summed about it (one round
    # of collectives while it is near the batch mean; see _stats.synced_stats).
    center = state["mean"].reshape((1,) * (x.ndim - len(bshape)) + bshape)
    y, mean, var, n = train_fn(x, scale, bias, mask, center, cfg)
    if accumulating:
        if not accumulator:
            dtype = jnp.promote_types(state["mean"].dtype, cd)
            accumulator = accumulation.empty_accumulator(feature_shape, dtype)
        accumulator = accumulation.accumulate(accumulator, mean, var, n)
        return y.reshape(x_shape), {**state, **memory, **accumulator}
    new_state = update_running(
        state,
        mean,
        var,
        n,
        momentum=momentum,
        unbiased_var=jbn_options["unbiased_running_var"],
        finite_only=jbn_options["finite_running_stats"],
        debias=debias,
        feature_shape=feature_shape,
    )
    if group is not None:  # this device's own group
        y = lax.dynamic_index_in_dim(y, group, 0, keepdims=False)
    return y.reshape(x_shape), {**new_state, **memory, **accumulator}
