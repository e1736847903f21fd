"""jbn.recalibrate_batch_stats on flax.linen models keeps the training guard: a feature
whose batch statistics are not finite skips that batch, and the other features'
statistics are exact (NumPy float64 reference, tests/helpers.py), unless the layer
asks for flax's behaviour (finite_running_stats=False).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NONFINITE_FEATURES as FEATURES
from helpers import STALE_MEAN as OLD_MEAN
from helpers import STALE_VAR as OLD_VAR
from helpers import check_nonfinite_recalibration as _check
from helpers import nonfinite_batches as _batches
from helpers import nonfinite_reference as _reference

import jbn


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
