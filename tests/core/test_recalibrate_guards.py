"""Recalibration keeps the training guard: a feature whose batch statistics are not finite
skips that batch, and the other features' statistics are exact (NumPy float64 reference)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn

FEATURES = 4
EPS = 1e-5
OLD_MEAN, OLD_VAR = 7.0, 3.0  # stale statistics, to tell "kept" from "recalibrated"


def _batches(bad: float) -> list[np.ndarray]:
    """Three batches; feature 0 is bad in every batch, feature 2 in batch 1 only."""
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(1.0 + i, 1.0 + 0.5 * i, (6, FEATURES)).astype(np.float32) for i in range(3)
    ]
    for i, b in enumerate(batches):
        b[i % 6, 0] = bad
    batches[1][4, 2] = bad
    return batches


def _reference(batches: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer of two batch norms in sequence, training mode (scale 1, bias 0): the
    float64 statistics of each feature over the batches whose statistics are finite,
    NaN where no batch is (the layer keeps its statistics there)."""
    h = [np.asarray(b, np.float64) for b in batches]
    layers = []
    with np.errstate(invalid="ignore"):
        for _ in range(2):
            mean, var = np.full(FEATURES, np.nan), np.full(FEATURES, np.nan)
            for c in range(FEATURES):
                good = [
                    b[:, c] for b in h if np.isfinite(b[:, c].mean()) and np.isfinite(b[:, c].var())
                ]
                if good:
                    mean[c], var[c] = np.concatenate(good).mean(), np.concatenate(good).var()
            layers.append((mean, var))
            h = [(b - b.mean(0)) / np.sqrt(b.var(0) + EPS) for b in h]
    return layers


def _check(layers, reference, counts=None) -> None:
    for (mean, var), (want_mean, want_var) in zip(layers, reference, strict=True):
        mean, var = np.asarray(mean), np.asarray(var)
        kept = np.isnan(want_mean)
        assert kept.tolist() == [True, False, False, False]
        np.testing.assert_array_equal(mean[kept], OLD_MEAN)
        np.testing.assert_array_equal(var[kept], OLD_VAR)
        np.testing.assert_allclose(mean[~kept], want_mean[~kept], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[~kept], want_var[~kept], rtol=1e-5, atol=1e-6)
    if counts is not None:
        # A cumulative layer counts, per feature, the batches it took in: none for
        # feature 0, all but batch 1 for feature 2.
        np.testing.assert_array_equal(counts, [0, 3, 2, 3])


class LinenNet(nn.Module):
    finite: bool = True

    @nn.compact
    def __call__(self, x):
        x = jbn.BatchNorm(use_running_average=False, finite_running_stats=self.finite)(x)
        return jbn.BatchNorm(use_running_average=False, momentum=None)(x)


def _linen_variables(model: nn.Module) -> dict:
    v = model.init(jax.random.key(0), jnp.ones((2, FEATURES)))
    stale = {"mean": OLD_MEAN, "var": OLD_VAR}
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.full_like(a, stale[p[-1].key]) if p[-1].key in stale else a,
        v["batch_stats"],
    )
    return {**v, "batch_stats": stats}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_linen_recalibration_skips_nonfinite_features(bad):
    model = LinenNet()
    batches = _batches(bad)
    new = jbn.recalibrate_batch_stats(
        lambda v, x: model.apply(v, x, mutable=["batch_stats"]), _linen_variables(model), batches
    )
    stats = new["batch_stats"]
    layers = [(stats[k]["mean"], stats[k]["var"]) for k in ("BatchNorm_0", "BatchNorm_1")]
    _check(layers, _reference(batches), np.asarray(stats["BatchNorm_1"]["count"]))


def test_linen_recalibration_as_flax_when_asked():
    model = LinenNet(finite=False)
    new = jbn.recalibrate_batch_stats(
        lambda v, x: model.apply(v, x, mutable=["batch_stats"]),
        _linen_variables(model),
        _batches(np.nan),
    )
    mean = np.asarray(new["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.isnan(mean[[0, 2]]).all() and np.isfinite(mean[[1, 3]]).all()


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.bn1 = jbn.nnx.BatchNorm(FEATURES, rngs=rngs)
        self.bn2 = jbn.nnx.BatchNorm(FEATURES, momentum=None, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn2(self.bn1(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nnx_recalibration_skips_nonfinite_features(bad):
    model = NnxNet(nnx.Rngs(0))
    for bn in (model.bn1, model.bn2):
        bn.mean[...] = jnp.full(FEATURES, OLD_MEAN)
        bn.var[...] = jnp.full(FEATURES, OLD_VAR)
    model.train()
    batches = _batches(bad)
    jbn.nnx.recalibrate_batch_stats(model, batches)
    layers = [(bn.mean[...], bn.var[...]) for bn in (model.bn1, model.bn2)]
    _check(layers, _reference(batches), np.asarray(model.bn2.count[...]))


def test_a_layer_without_a_finite_batch_is_not_recalibrated():
    model = NnxNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"not recalibrated: \['bn1', 'bn2'\].*NaN or inf"):
        jbn.nnx.recalibrate_batch_stats(model, [jnp.full((4, FEATURES), jnp.nan)])
    np.testing.assert_array_equal(model.bn1.mean[...], 0.0)
