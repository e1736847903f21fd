"""The check every frontend's Tent passes: a NaN or inf batch moves nothing and is counted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def assert_same_tree(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))  # bit for bit


def check_tent_skips_bad_batches(tent, good, model_params=None):
    """Runs ``tent`` over a good batch, a NaN batch (update), an inf batch (step) and a good one.

    ``model_params()``, if given, reads the parameters from the model itself (NNX
    adapts in place), which must follow ``tent.params``.
    """
    source = tent.params
    tent.update(good)  # a moved model and a non-trivial optimizer state
    assert tent.skipped == 0
    for n, bad_value in enumerate((jnp.nan, jnp.inf), start=1):
        params, opt_state = tent.params, tent.opt_state
        bad = good.at[0].set(bad_value)  # one bad example in the batch
        if n == 1:
            tent.update(bad)
        else:
            tent.step(bad)
        assert tent.skipped == n
        assert_same_tree(tent.params, params)
        assert_same_tree(tent.opt_state, opt_state)
        if model_params is not None:
            assert_same_tree(model_params(), params)
        assert bool(jnp.isfinite(tent.predict(good)).all())
    params = tent.params
    tent.update(good)  # adaptation goes on
    assert tent.skipped == 2
    moved = [
        not np.array_equal(u, v)
        for u, v in zip(jax.tree.leaves(tent.params), jax.tree.leaves(params), strict=True)
    ]
    assert any(moved)
    assert all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(tent.params))
    tent.reset()
    assert_same_tree(tent.params, source)
    assert tent.skipped == 2  # reset() keeps the count
    if model_params is not None:
        assert_same_tree(model_params(), source)
