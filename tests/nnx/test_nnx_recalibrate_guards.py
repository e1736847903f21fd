"""jbn.nnx.recalibrate_batch_stats keeps the training guard: a feature whose batch
statistics are not finite skips that batch, and the other features' statistics are
exact (NumPy float64 reference, tests/helpers.py); a layer without a finite batch is
not recalibrated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import NONFINITE_FEATURES as FEATURES
from helpers import STALE_MEAN as OLD_MEAN
from helpers import STALE_VAR as OLD_VAR
from helpers import check_nonfinite_recalibration as _check
from helpers import nonfinite_batches as _batches
from helpers import nonfinite_reference as _reference

import jbn


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
