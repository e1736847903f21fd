"""jbn.linen.start_stream: a whole batch_stats tree seeded, so jax.lax.scan can carry it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

MODE = jbn.Stream(horizon=40.0, prior=8.0)


class SmallCNN(nn.Module):
    """Conv, jbn.BatchNorm, Conv, flax.linen.BatchNorm, pooled head (NHWC)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(jbn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(3)(x.mean((1, 2)))


def _trained_like(variables):
    """Running statistics away from (0, 1), so seeding from them is visible."""
    rng = np.random.default_rng(0)

    def move(path, leaf):
        name = path[-1].key
        shift = rng.normal(size=leaf.shape) * 0.3
        return leaf + shift if name == "mean" else leaf * np.exp(shift)

    stats = jax.tree_util.tree_map_with_path(move, variables["batch_stats"])
    return {**variables, "batch_stats": stats}


def test_seeded_tree_scans_like_the_unrolled_loop():
    model = SmallCNN()
    xs = jax.random.normal(jax.random.key(1), (4, 2, 6, 6, 3)) * 1.5 + 0.5  # 4 batches
    init = jax.jit(jbn.linen.intercept()(model.init))
    variables = _trained_like(init(jax.random.key(0), xs[0]))

    seeded = jbn.linen.start_stream(variables, MODE)
    for path in (("BatchNorm_0",), ("BatchNorm_1",)):  # jbn's and flax's
        entry, running = seeded["batch_stats"][path[0]], variables["batch_stats"][path[0]]
        np.testing.assert_array_equal(entry["stream_mean"], running["mean"])
        np.testing.assert_array_equal(entry["stream_var"], running["var"])
        np.testing.assert_array_equal(entry["stream_count"], np.full(4, 40.0))
    assert seeded["params"] is variables["params"]

    @jax.jit
    @jbn.linen.intercept()
    @jbn.linen.use_stream(MODE)
    def step(v, x):
        return model.apply(v, x, mutable=["batch_stats"])

    def scanned(v, xs):
        def body(stats, x):
            y, updates = step({**v, "batch_stats": stats}, x)
            return updates["batch_stats"], y

        return jax.lax.scan(body, v["batch_stats"], xs)

    stats, ys = scanned(seeded, xs)

    v, want = variables, []  # unseeded: the first call creates the memory
    for x in xs:
        y, updates = step(v, x)
        v = {**v, **updates}
        want.append(y)
    np.testing.assert_allclose(ys, np.stack(want), rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(stats) == jax.tree.structure(v["batch_stats"])
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(v["batch_stats"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The memory moved: 4 batches of 2 examples were taken in.
    moved = (
        stats["BatchNorm_1"]["stream_mean"] - seeded["batch_stats"]["BatchNorm_1"]["stream_mean"]
    )
    assert np.max(np.abs(moved)) > 1e-3
    # And back: reset_stream removes what start_stream put in.
    back = jbn.linen.reset_stream(seeded)
    assert jax.tree.structure(back) == jax.tree.structure(variables)


def test_bad_input_is_one_clear_error():
    model = nn.Sequential([nn.Dense(2), nn.BatchNorm(use_running_average=True)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"start_stream: variables must be a linen variables dict"):
        jbn.linen.start_stream(variables["batch_stats"]["layers_1"]["mean"], MODE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"collections \['params'\]"):
        jbn.linen.start_stream({"params": variables["params"]}, MODE)
    with pytest.raises(ValueError, match="holds no batch norm's running statistics"):
        jbn.linen.start_stream({**variables, "batch_stats": {}}, MODE)
    with pytest.raises(TypeError, match="jbn.Stream"):
        jbn.linen.start_stream(variables, 16.0)  # type: ignore[arg-type]
