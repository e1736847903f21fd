"""NumPy float64 transcriptions of the batch-norm formulas, independent of jbn.

Forward (Ioffe & Szegedy 2015, Algorithm 1), per feature over the reduced axes:
    μ = Σx/N,  σ² = Σ(x-μ)²/N,  x̂ = (x-μ)/√(σ²+ε),  y = γx̂ + β
Backward (the seeds' closed form), with dx̂ = γ dy:
    dx = (N dx̂ - Σdx̂ - x̂ Σ(dx̂ x̂)) / (N √(σ²+ε)),  dγ = Σ dy x̂,  dβ = Σ dy
Masked entries are left out of the statistics and N counts the unmasked ones.
"""

from __future__ import annotations

import math

import numpy as np


def _axes(x, axis):
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    feature = tuple(sorted(a % x.ndim for a in axis))
    reduce = tuple(a for a in range(x.ndim) if a not in feature)
    bshape = tuple(1 if a in reduce else s for a, s in enumerate(x.shape))
    fshape = tuple(x.shape[a] for a in feature)
    return reduce, bshape, fshape


def _mask(x, mask):
    if mask is None:
        return np.ones(x.shape, bool)
    return np.broadcast_to(np.asarray(mask, bool), x.shape)


def np_stats(x, axis=-1, mask=None):
    """Per-feature (mean, biased var, count), float64, in the broadcast feature shape."""
    x = np.asarray(x, np.float64)
    reduce, _, _ = _axes(x, axis)
    m = _mask(x, mask)
    n = m.sum(axis=reduce, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore"):  # a fully masked feature has no statistics: NaN
        mean = np.where(m, x, 0).sum(axis=reduce, keepdims=True) / n
        var = np.where(m, (x - mean) ** 2, 0).sum(axis=reduce, keepdims=True) / n
    return mean, var, n


def np_forward(x, scale, bias, axis=-1, eps=1e-5, mask=None):
    """Training-mode y, float64, plus (mean, var, count) in the feature shape."""
    x = np.asarray(x, np.float64)
    _, bshape, fshape = _axes(x, axis)
    mean, var, n = np_stats(x, axis, mask)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = np.asarray(scale, np.float64).reshape(bshape) * xhat + np.asarray(bias, np.float64).reshape(
        bshape
    )
    return y, mean.reshape(fshape), var.reshape(fshape), n.reshape(fshape)


def np_eval(x, scale, bias, mean, var, axis=-1, eps=1e-5):
    x = np.asarray(x, np.float64)
    _, bshape, _ = _axes(x, axis)
    r = lambda v: np.asarray(v, np.float64).reshape(bshape)  # noqa: E731
    return r(scale) * (x - r(mean)) / np.sqrt(r(var) + eps) + r(bias)


def np_backward(x, scale, dy, axis=-1, eps=1e-5, mask=None):
    """(dx, dscale, dbias) of training-mode batch norm, by the closed form."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    reduce, bshape, fshape = _axes(x, axis)
    m = _mask(x, mask)
    mean, var, n = np_stats(x, axis, mask)
    xhat = (x - mean) / np.sqrt(var + eps)
    # Padded outputs are γx̂ + β too: they count in every sum over dy, while only
    # unmasked inputs move the statistics.
    dxhat = np.asarray(scale, np.float64).reshape(bshape) * dy
    s = lambda v: v.sum(axis=reduce, keepdims=True)  # noqa: E731
    dx = (n * dxhat - m * (s(dxhat) + xhat * s(dxhat * xhat))) / (n * np.sqrt(var + eps))
    return dx, s(dy * xhat).reshape(fshape), s(dy).reshape(fshape)


def np_running(old_mean, old_var, mean, var, momentum):
    """Flax's running update: new = momentum * old + (1 - momentum) * batch."""
    return (
        momentum * np.asarray(old_mean, np.float64) + (1 - momentum) * np.asarray(mean, np.float64),
        momentum * np.asarray(old_var, np.float64) + (1 - momentum) * np.asarray(var, np.float64),
    )


def np_prior(x, scale, bias, run_mean, run_var, prior, form, axis=-1, eps=1e-5, mask=None):
    """y in float64 with prior-weighted statistics: N examples' statistics pooled with n examples'.

    An example is a slice along axis 0 when axis 0 is reduced, else the whole array;
    n = the counted values per feature / the values one example gives each feature.
    """
    x = np.asarray(x, np.float64)
    mean_b, var_b, n = np_stats(x, axis, mask)
    bshape = mean_b.shape
    reduce, _, _ = _axes(x, axis)
    n = n / math.prod(x.shape[a] for a in reduce if a != 0)  # examples
    rm = np.asarray(run_mean, np.float64).reshape(bshape)
    rv = np.asarray(run_var, np.float64).reshape(bshape)
    if math.isinf(prior):
        w = np.ones_like(n)
    else:
        w = np.where(n > 0, prior / np.maximum(prior + n, 1e-300), 1.0)
    mean_b = np.where(n > 0, mean_b, 0.0)
    var_b = np.where(n > 0, var_b, 0.0)
    if form == "pooled" and not math.isinf(prior):
        # Pool the two groups by their sizes (Chan): N examples of the running statistics.
        total = prior + n
        mean = np.where(total > 0, (prior * rm + n * mean_b) / np.maximum(total, 1e-300), rm)
        m2 = prior * rv + n * var_b + prior * n / np.maximum(total, 1e-300) * (rm - mean_b) ** 2
        var = np.where(total > 0, m2 / np.maximum(total, 1e-300), rv)
    else:
        mean = w * rm + (1 - w) * mean_b
        var = w * rv + (1 - w) * var_b
    s = np.asarray(scale, np.float64).reshape(bshape)
    b = np.asarray(bias, np.float64).reshape(bshape)
    return s * (x - mean) / np.sqrt(var + eps) + b


def np_prior_each(x, scale, bias, run_mean, run_var, prior, axis=-1):
    """:func:`np_prior` (pooled) on each example of ``x`` (a slice along axis 0) alone: the
    stream mode's output for examples that give each feature several values."""
    x = np.asarray(x, np.float64)
    ys = [np_prior(x[i : i + 1], scale, bias, run_mean, run_var, prior, "pooled", axis)
          for i in range(len(x))]  # fmt: skip
    return np.concatenate(ys)


def np_stream_memory(memory, x, horizon, axis=-1):
    """The stream memory after taking in batch ``x``, float64, without the surprise cut.

    ``memory`` is ``(mean, var, count)`` per feature (count in examples); the
    batch's (mean, var, n examples) is pooled with it by Chan's formula,
        w = n_m / (n_m + n_b),  μ = w μ_m + (1 - w) μ_b,
        σ² = w σ²_m + (1 - w) σ²_b + w (1 - w) (μ_m - μ_b)²,
    and the count n_m + n_b is capped at ``horizon``. Returns the new ``(mean, var, count)``
    in the feature shape. An example is a slice along axis 0 (as in :func:`np_prior`).
    """
    x = np.asarray(x, np.float64)
    reduce, _, fshape = _axes(x, axis)
    mean_b, var_b, n = np_stats(x, axis)
    n = n / math.prod(x.shape[a] for a in reduce if a != 0)
    mean_b, var_b, n = (np.reshape(v, fshape) for v in (mean_b, var_b, n))
    mean_m, var_m, n_m = (np.broadcast_to(np.asarray(v, np.float64), fshape) for v in memory)
    w = n_m / (n_m + n)
    mean = w * mean_m + (1 - w) * mean_b
    var = w * var_m + (1 - w) * var_b + w * (1 - w) * (mean_m - mean_b) ** 2
    return mean, var, np.minimum(n_m + n, horizon)


def np_stream_memories(running, xs, horizon, axis=-1):
    """The memory after each batch of ``xs``, started from ``running`` = (mean, var) counted
    as ``horizon`` examples (see :func:`np_stream_memory`)."""
    mean, var = (np.asarray(v, np.float64) for v in running)
    memory = (mean, var, np.full(mean.shape, float(horizon)))
    out = []
    for x in xs:
        memory = np_stream_memory(memory, x, horizon, axis)
        out.append(memory)
    return out
