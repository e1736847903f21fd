"""Prior-weighted statistics: test-time adaptation of batch norm (Schneider et al. 2020).

At test time a batch of ``n`` examples is normalized with statistics that pool
the running statistics, counted as ``N`` examples (the *prior*), with the
batch's own. An example is a slice along axis 0 when axis 0 is reduced (the
batch axis), and the whole local array otherwise (one example per device, as
under Equinox's vmap); it gives each feature ``v`` values (e.g. H·W for a
convolution's NHWC output, 1 for a dense layer's), and a batch with ``c``
counted values per feature (masks, ``axis_name``) has n = c / v examples. With
w = N / (N + n), the exact pooled form is Chan's combination of the two groups,

    μ = w μ_run + (1 - w) μ_B,
    σ² = w σ²_run + (1 - w) σ²_B + w (1 - w) (μ_run - μ_B)²,

and the paper's linear mix leaves out the between-groups term. ``N = 0`` is the
batch's statistics, ``N = ∞`` the running ones (w = 1); a feature without a
counted value keeps the running statistics. The running statistics carry no
gradient; the batch's share does, through plain differentiable jnp (no
custom_vjp), so test-time entropy minimization (TENT) can train through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks as checks
from ._checks import PriorForm
from ._stats import abs_sq, batch_stats, compute_dtype, real_dtype
from ._train import TrainConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Prior:
    """The prior mode of :func:`jbn.bn_forward` (its ``train`` argument): test-time adaptation.

    ``bn_forward(params, state, x, jbn.Prior(16))`` normalizes with the running
    statistics, counted as ``n`` examples, pooled with the batch's, and updates
    nothing; it is what ``bn_forward(params, state, x, False, prior=16)`` does.

    Attributes:
      n: N, the number of examples the running statistics count as: a number
        >= 0 (``inf``: the running statistics alone; 0: the batch's), or a scalar
        array (e.g. traced under jit; the mode is then not hashable).
      form: ``"pooled"`` (default: Chan's exact pooling) or ``"linear"``
        (Schneider et al.'s mix, without the between-groups term).
    """

    n: Any
    form: PriorForm = "pooled"

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", checks.prior_option(self.n, "n"))
        checks.prior_form(self.form)


def prior_weight(prior: Array, n: Array, per_example: int) -> Array:
    """w = N / (N + n) for n = count / per_example examples; 1 where the batch has no value.

    Written as 1 / (1 + n / N), so N = ∞ gives 1 and N = 0 gives 0 (n > 0).
    """
    examples = jnp.maximum(n, 1) / per_example
    with jax.numpy_dtype_promotion("standard"):
        ratio = examples / prior.astype(n.dtype)
    return jnp.where(n > 0, 1.0 / (1.0 + ratio), 1.0).astype(n.dtype)


def prior_stats(
    run_mean: Array, run_var: Array, mean: Array, var: Array, w: Array, form: str
) -> tuple[Array, Array]:
    """The pooled (``form="pooled"``) or linearly mixed (``"linear"``) mean and variance."""
    pooled_mean = w * run_mean + (1.0 - w) * mean
    pooled_var = w * run_var + (1.0 - w) * var
    if form == "pooled":
        pooled_var = pooled_var + w * (1.0 - w) * abs_sq(run_mean - mean)
    return pooled_mean, jnp.maximum(pooled_var, 0.0)


def examples_size(x_shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
    """Values one example gives each feature: the reduced axes but the batch axis 0."""
    size = 1
    for a in reduce_axes:
        if a != 0:
            size *= x_shape[a]
    return size


def prior_forward(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    running: tuple[Array, Array],
    prior: Array,
    cfg: TrainConfig,
    form: str,
    *,
    finite_only: bool = False,
) -> tuple[Array, tuple[Array, Array, Array]]:
    """y = γ (x - μ) / √(σ² + ε) + β with prior-weighted statistics.

    Args:
      x: the input.
      scale, bias: already in the broadcast feature shape.
      mask: boolean of ``x``'s shape, or None.
      running: ``(mean, var)`` running statistics in the broadcast feature shape.
      prior: N examples, a float32 scalar (inf allowed).
      cfg: the call's ``TrainConfig`` (statistics settings, epsilon, dtypes).
      form: ``"pooled"`` or ``"linear"``.
      finite_only: a feature whose batch statistics are not finite has no say
        (it is normalized with the running statistics alone).

    Returns:
      ``(y, (mean_b, var_b, examples))``: the output, and the batch's own
      statistics and number of examples per feature, without gradient; where the
      batch has no say (no counted value, or ``finite_only`` and not finite),
      ``examples`` is 0 and the statistics are the running ones.
    """
    cd = compute_dtype(x.dtype)
    rd = real_dtype(cd)
    mean_b, var_b, n = _own_stats(x, mask, running, cfg, finite_only)
    run_mean = lax.stop_gradient(running[0]).astype(cd)
    run_var = lax.stop_gradient(running[1]).astype(rd)
    per_example = examples_size(x.shape, cfg.stats.reduce_axes)
    w = prior_weight(lax.stop_gradient(prior), n, per_example)
    # Where the batch has no say (w = 1) its statistics may be NaN (an empty or
    # non-finite feature): keep them out of the result and of the gradient.
    mean_w = jnp.where(w < 1, mean_b, run_mean)
    var_w = jnp.where(w < 1, var_b, run_var)
    mean, var = prior_stats(run_mean, run_var, mean_w, var_w, w, form)
    a = scale.astype(rd) * lax.rsqrt(var + cfg.epsilon)
    y = (x.astype(cd) - mean) * a + bias.astype(rd)
    return y.astype(cfg.out_dtype), _share(mean_b, var_b, n, (run_mean, run_var), per_example)


def batch_share(
    x: Array, mask: Array | None, running: tuple[Array, Array], cfg: TrainConfig
) -> tuple[Array, Array, Array]:
    """The batch's own ``(mean, var, examples)``, what :func:`prior_forward` returns beside y.

    Without gradient; a feature whose statistics are not finite, or that has no
    counted value, has 0 examples and the ``running`` statistics.
    """
    mean_b, var_b, n = _own_stats(x, mask, running, cfg, finite_only=True)
    cd = compute_dtype(x.dtype)
    ref = (running[0].astype(cd), running[1].astype(real_dtype(cd)))
    return _share(mean_b, var_b, n, ref, examples_size(x.shape, cfg.stats.reduce_axes))


def _own_stats(
    x: Array, mask: Array | None, running: tuple[Array, Array], cfg: TrainConfig, finite_only: bool
) -> tuple[Array, Array, Array]:
    """The batch's mean, variance and counted values per feature (0 where not finite, if asked)."""
    mean_b, var_b, n = batch_stats(x, mask, cfg.stats, running[0])
    n = n.astype(real_dtype(compute_dtype(x.dtype)))
    if finite_only:
        n = jnp.where(jnp.isfinite(mean_b) & jnp.isfinite(var_b), n, 0.0)
    return mean_b, var_b, n


def _share(
    mean_b: Array, var_b: Array, n: Array, running: tuple[Array, Array], per_example: int
) -> tuple[Array, Array, Array]:
    has_say = n > 0
    return (
        lax.stop_gradient(jnp.where(has_say, mean_b, running[0])),
        lax.stop_gradient(jnp.where(has_say, var_b, running[1])),
        lax.stop_gradient(n / per_example),
    )
