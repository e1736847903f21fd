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


def np_stream(
    xs,
    masks,
    scale,
    bias,
    mean0,
    var0,
    horizon,
    prior,
    surprise=0.6,
    anchor=0.7,
    settle=0.1,
    gate=0.9,
    verdicts=None,
    eps=1e-5,
):
    """The stream mode: outputs and memories (count, mean, var) after each (B, ..., C) batch.

    In float64; the features are the last axis, and the memory starts from
    ``(mean0, var0)`` counted as ``horizon``.

    An example is a slice along axis 0, with one value per feature for (B, C)
    input and H·W for NHWC. Each example is normalized on its own: its values'
    statistics pooled with a reference counted as ``prior`` examples, the memory
    (or, anchored, the training statistics); with one value per feature, the
    reference alone. With ``surprise`` (τ; jbn.Stream's default 0.6), the count
    is first cut to the least over the examples of horizon / (1 + (log r /
    τ)²), r an example's mean over its counted finite features of the mean over
    its values of (x - μ_m)² / (σ²_m + ε). With ``anchor`` (δ; default 0.7), an
    example whose score (the same mean of (x - μ)² / (σ² + ε) + log(σ² + ε))
    under the training statistics is lower than under the memory by more than δ
    takes the training statistics as its reference; if there is one, the memory
    restarts from the training statistics (counted as the horizon, no cut)
    before it takes the batch in. With ``settle`` (default 0.1), where the
    memory's count after the cut is below settle · horizon, an example that is
    not anchored counts the memory as one example (when prior > 1). With
    ``gate`` (default 0.9), only an example whose r under the training
    statistics has |log r| > gate counts in the cut; ``verdicts`` (one boolean
    per example per batch), when given, says instead which examples count (the
    verdict of an earlier layer, passed along).
    """
    scale, bias = (np.asarray(v, np.float64) for v in (scale, bias))
    mean0, var0 = np.asarray(mean0, np.float64), np.asarray(var0, np.float64)
    finite = math.isfinite(horizon)
    C = mean0.shape[-1]
    n_m = np.full(C, horizon, np.float64)
    mu, m2 = mean0.copy(), var0 * (horizon if finite else 1.0)
    ys, memories = [], []

    def group_stats(x, mask):  # per feature over the examples and values of the mask
        axes = tuple(range(x.ndim - 1))
        cnt = mask.sum(axes).astype(np.float64)
        good = cnt > 0
        mu_b = np.where(good, np.sum(np.where(mask, x, 0.0), axes) / np.maximum(cnt, 1), 0.0)
        var_b = np.sum(np.where(mask, (x - mu_b) ** 2, 0.0), axes) / np.maximum(cnt, 1)
        good &= np.isfinite(mu_b) & np.isfinite(var_b)
        per_example = np.prod(x.shape[1:-1], dtype=np.float64)
        cnt = np.where(good, cnt, 0.0) / per_example
        return np.where(good, mu_b, 0.0), np.where(good, var_b, 0.0), cnt

    def pooled(x, mask, mean_r, var_r, prior):  # the reference counted as prior examples
        mu_b, var_b, cnt = group_stats(x, mask)
        n = np.broadcast_to(np.asarray(prior, np.float64), mu_b.shape)
        alone = np.isinf(n) | (cnt == 0)
        n = np.where(alone, 1.0, n)
        tot = n + cnt
        mean = (n * mean_r + cnt * mu_b) / tot
        var = (n * var_r + cnt * var_b + n * cnt / tot * (mean_r - mu_b) ** 2) / tot
        return np.where(alone, mean_r, mean), np.where(alone, var_r, var)

    def scores(xi, mi, mean, var):  # one example: (r, score), or None without a counted value
        keep = mi & np.isfinite(xi)
        inner = tuple(range(xi.ndim - 1))
        values = keep.sum(inner)
        feat = values > 0
        if not feat.any():
            return None
        e = np.sum(np.where(keep, (xi - mean) ** 2 / (var + eps), 0.0), inner)
        e = e[feat] / values[feat]
        feat_ok = np.isfinite(e)
        if not feat_ok.any():
            return None
        e = e[feat_ok]
        return np.mean(e), np.mean(e + np.log(var + eps)[feat][feat_ok])

    for x, mask in zip(xs, masks, strict=True):
        x = np.asarray(x, np.float64)
        mask = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        var_m = m2 / n_m if finite else m2
        back = np.zeros(len(x), bool)
        if anchor is not None:
            for i, (xi, mi) in enumerate(zip(x, mask, strict=True)):
                s_t, s_m = scores(xi, mi, mean0, var0), scores(xi, mi, mu, var_m)
                back[i] = s_t is not None and s_t[1] + anchor < s_m[1]
        cut = horizon  # the surprise cut: the least over the examples
        if surprise is not None:
            for i, (xi, mi) in enumerate(zip(x, mask, strict=True)):
                sc = scores(xi, mi, mu, var_m)
                if verdicts is not None:
                    far = bool(verdicts[len(ys)][i])
                elif gate is not None:
                    s_t = scores(xi, mi, mean0, var0)
                    far = s_t is not None and abs(np.log(s_t[0])) > gate
                else:
                    far = True
                if sc is not None and far:
                    cut = min(cut, horizon / (1.0 + (np.log(sc[0]) / surprise) ** 2))
        young = np.zeros(C, bool)
        if settle is not None and prior > 1:
            young = np.minimum(n_m, cut) < settle * horizon
        one_value = math.prod(x.shape[1:-1]) == 1
        y = np.empty_like(x)
        for i in range(len(x)):
            mean_r, var_r = (mean0, var0) if back[i] else (mu, var_m)
            n = np.where(young & ~back[i], 1.0, prior)
            if one_value:  # one value per feature: the reference alone
                n = np.full(C, np.inf)
            mean_e, var_e = pooled(x[i : i + 1], mask[i : i + 1], mean_r, var_r, n)
            y[i] = scale * (x[i] - mean_e) / np.sqrt(var_e + eps) + bias
        ys.append(y)
        mu_b, var_b, cnt = group_stats(x, mask)
        good = cnt > 0
        if surprise is not None and good.any() and not back.any():  # no cut when re-seeded
            n_m = np.where(good, np.minimum(n_m, cut), n_m)
            m2 = var_m * n_m
        if back.any():  # the memory restarts from the training statistics
            n_m, mu = np.full(C, horizon, np.float64), mean0.copy()
            m2 = var0 * (horizon if finite else 1.0)
        if finite:
            n = n_m + cnt
            delta = mu_b - mu
            mu = mu + delta * cnt / n
            m2 = m2 + cnt * var_b + delta**2 * n_m * cnt / n
            capped = np.minimum(n, horizon)
            m2, n_m = m2 * capped / n, capped
        memories.append((n_m.copy(), mu.copy(), (m2 / n_m if finite else m2)))
    return ys, memories


def np_verdicts(xs, mean0, var0, gate=0.9, eps=1e-5):
    """Per batch of ``xs`` (features last), per example: whether |log r| > ``gate``.

    r is the mean over the example's features of the mean over its values of
    (x - μ)² / (σ² + ε) under ``(mean0, var0)``: the verdict a model's first
    batch norm in the stream mode passes to the ones after it.
    """
    mean0, var0 = np.asarray(mean0, np.float64), np.asarray(var0, np.float64)
    out = []
    for x in xs:
        x = np.asarray(x, np.float64)
        inner = tuple(range(1, x.ndim - 1))
        e = np.mean((x - mean0) ** 2 / (var0 + eps), axis=inner).reshape(len(x), -1)
        out.append(np.abs(np.log(e.mean(axis=1))) > gate)
    return out
