"""Helpers shared by the tests.

The MNIST demo (``tests/demo/test_demo_*.py``): tiny synthetic IDX data sets and configurations.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

import jbn
from mnist_demo import config as demo_config
from mnist_demo import mnist

REPO = pathlib.Path(__file__).resolve().parent.parent
#: The real MNIST files the repository ships (the demo's default; every clone holds them).
REAL_MNIST = REPO / "data" / "mnist"
N_TRAIN, N_TEST = 512, 128


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: a bright 7x7 square whose place depends on the label, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = 2 + 8 * (y // 4), 2 + 8 * (y % 4)
        images[i, r : r + 7, c : c + 7] = 255
    return images, labels


def write_dataset(
    directory: pathlib.Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = True
) -> pathlib.Path:
    """Writes the four IDX files (gzip-compressed or not) of a small fake MNIST."""
    directory.mkdir(parents=True, exist_ok=True)
    train = synthetic_digits(n_train, 0)
    test = synthetic_digits(n_test, 1)
    suffix = ".gz" if gz else ""
    for role, array in (
        ("train_images", train[0]),
        ("train_labels", train[1]),
        ("test_images", test[0]),
        ("test_labels", test[1]),
    ):
        mnist.write_idx(directory / (mnist.FILES[role].name + suffix), array)
    return directory


def tiny_config(tiny_dir: pathlib.Path, **kwargs) -> demo_config.Config:
    """A one-epoch configuration on the tiny synthetic data set."""
    base = dict(
        epochs=1,
        batch_size=32,
        eval_batch_size=100,
        data_dir=str(tiny_dir),
        download=False,
        verify=False,
        progress=False,
        learning_rate=3e-3,
    )
    base.update(kwargs)
    return dataclasses.replace(demo_config.default_config(), **base)


# --------------------------------------------------------------------------- #
# jbn's tests: random variables, perturbations, tree comparisons.
# --------------------------------------------------------------------------- #


def feature_shape(shape: tuple[int, ...], axis) -> tuple[int, ...]:
    """The sizes of the feature axes ``axis`` of an array of ``shape``."""
    axis = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axis))


def random_variables(
    key,
    fshape,
    dtype=None,
    *,
    scale_std: float = 0.5,
    bias_std: float = 0.3,
    mean_std: float = 0.2,
    var_range: tuple[float, float] = (1.0, 2.0),
):
    """Non-trivial ``(params, state)`` of a batch norm: γ ≈ 1 ± scale_std, β, μ normal, var uniform."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    k = jax.random.split(key, 4)
    params = {
        "scale": (1.0 + scale_std * jax.random.normal(k[0], fshape)).astype(dtype),
        "bias": (bias_std * jax.random.normal(k[1], fshape)).astype(dtype),
    }
    low, high = var_range
    state = {
        "mean": (mean_std * jax.random.normal(k[2], fshape)).astype(dtype),
        "var": jax.random.uniform(k[3], fshape, minval=low, maxval=high).astype(dtype),
    }
    return params, state


def _perturbed(name: str, leaf, rng: np.random.Generator, std: float = 0.5, every_leaf=False):
    """A new value for a variable ``name``: var uniform in [0.5, 2], others moved by N(0, std²).

    Only a batch norm's mean, scale and bias move, unless ``every_leaf``.
    """
    import jax.numpy as jnp

    if name == "var":
        return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    if every_leaf or name in ("mean", "scale", "bias"):
        return jnp.asarray(np.asarray(leaf) + std * rng.standard_normal(leaf.shape), leaf.dtype)
    return leaf


def perturb_variables(variables, seed: int = 0, *, std: float = 0.5, every_leaf: bool = False):
    """Linen variables with non-trivial scale, bias and running statistics (a new tree)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _perturbed(path[-1].key, leaf, rng, std, every_leaf), variables
    )


def perturb_model(model, seed: int) -> None:
    """Gives every batch norm of an NNX ``model`` non-trivial scale, bias and statistics, in place."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "mean") and hasattr(m, "var") and isinstance(m.mean, nnx.BatchStat):
            for name in ("mean", "var", "scale", "bias"):
                variable = getattr(m, name)
                if variable is not None:
                    variable[...] = _perturbed(name, variable[...], rng)


def assert_trees_close(a, b, rtol: float = 1e-5, atol: float | None = None) -> None:
    """Leaves of equal dtype and shape, equal to rtol; atol defaults to rtol times the largest entry.

    (Gradients that are zero in exact arithmetic, e.g. of a bias right before a
    batch norm, are rounding noise in both implementations.)
    """
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    if atol is None:
        atol = rtol * max(
            (
                float(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0))
                for v in jax.tree.leaves(b)
            ),
            default=0.0,
        )

    def check(u, v):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)

    jax.tree.map(check, a, b)


def assert_close_to_float64(actual, expected, rtol=1e-5, atol=1e-6) -> None:
    """Trees of the same structure, ``actual``'s leaves (any dtype) close to ``expected``'s in float64."""
    import jax

    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol),
        actual,
        expected,
    )


def batch_and_variables(seed: int = 0, shape: tuple[int, ...] = (8, 3)):
    """A batch ``x = 1 + 2 N(0, 1)`` of ``shape`` and non-trivial ``(params, state)`` of its last axis."""
    import jax

    kx, kv = jax.random.split(jax.random.key(seed))
    x = 1.0 + 2.0 * jax.random.normal(kx, shape)
    params, state = random_variables(kv, (shape[-1],))
    return x, params, state


def changed_leaves(before, after) -> list[bool]:
    """For each leaf of two trees of the same structure, whether any of its entries changed."""
    import jax

    return [
        bool(np.any(np.asarray(a) != np.asarray(b)))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]


# --------------------------------------------------------------------------- #
# Recalibration (tests/linen/test_linen_recalibrate*.py, tests/nnx/test_nnx_recalibrate*.py).
# --------------------------------------------------------------------------- #


def recalibration_batches():
    """Three batches of 4 features, of unequal sizes and different distributions."""
    import jax

    k = jax.random.split(jax.random.key(8), 3)
    # Unequal sizes and different distributions: a plain average of batch statistics would be wrong.
    return [
        jax.random.normal(k[0], (5, 4)),
        3.0 + 2.0 * jax.random.normal(k[1], (9, 4)),
        -1.0 + 0.5 * jax.random.normal(k[2], (4, 4)),
    ]


#: Features of the non-finite batches below.
NONFINITE_FEATURES = 4
#: Stale running statistics, to tell "kept" from "recalibrated".
STALE_MEAN, STALE_VAR = 7.0, 3.0


def nonfinite_batches(bad: float) -> list[np.ndarray]:
    """Three batches; feature 0 is bad in every batch, feature 2 in batch 1 only."""
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(1.0 + i, 1.0 + 0.5 * i, (6, NONFINITE_FEATURES)).astype(np.float32)
        for i in range(3)
    ]
    for i, b in enumerate(batches):
        b[i % 6, 0] = bad
    batches[1][4, 2] = bad
    return batches


def nonfinite_reference(
    batches: list[np.ndarray], eps: float = 1e-5
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer of two batch norms in sequence, training mode (scale 1, bias 0): the
    float64 statistics of each feature over the batches whose statistics are finite,
    NaN where no batch is (the layer keeps its statistics there)."""
    h = [np.asarray(b, np.float64) for b in batches]
    layers = []
    with np.errstate(invalid="ignore"):
        for _ in range(2):
            mean = np.full(NONFINITE_FEATURES, np.nan)
            var = np.full(NONFINITE_FEATURES, np.nan)
            for c in range(NONFINITE_FEATURES):
                good = [
                    b[:, c] for b in h if np.isfinite(b[:, c].mean()) and np.isfinite(b[:, c].var())
                ]
                if good:
                    mean[c], var[c] = np.concatenate(good).mean(), np.concatenate(good).var()
            layers.append((mean, var))
            h = [(b - b.mean(0)) / np.sqrt(b.var(0) + eps) for b in h]
    return layers


def check_nonfinite_recalibration(layers, reference, counts=None) -> None:
    """Recalibrated ``[(mean, var), ...]`` against :func:`nonfinite_reference`: feature 0
    kept its stale statistics, the others are the reference's; ``counts``, a cumulative
    layer's, counted the batches each feature took in."""
    for (mean, var), (want_mean, want_var) in zip(layers, reference, strict=True):
        mean, var = np.asarray(mean), np.asarray(var)
        kept = np.isnan(want_mean)
        assert kept.tolist() == [True, False, False, False]
        np.testing.assert_array_equal(mean[kept], STALE_MEAN)
        np.testing.assert_array_equal(var[kept], STALE_VAR)
        np.testing.assert_allclose(mean[~kept], want_mean[~kept], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[~kept], want_var[~kept], rtol=1e-5, atol=1e-6)
    if counts is not None:
        # A cumulative layer counts, per feature, the batches it took in: none for
        # feature 0, all but batch 1 for feature 2.
        np.testing.assert_array_equal(counts, [0, 3, 2, 3])


# The stream mode of the relay tests (:func:`relay_stream`): every frontend's model runs it.
RELAY = jbn.Stream(horizon=40.0, prior=4.0, surprise=0.6, anchor=None, gate=0.8)


def relay_stream(seed: int = 0):
    """Two layers' inputs and NumPy's memories when the first layer's verdict gates both.

    A model with two batch norms, both with running statistics ``running``,
    the first fed ``xs`` and the second ``zs`` (NHWC, 3 features). ``zs`` is
    far from the training statistics throughout, so the second layer's own
    verdict would let every example cut its memory; ``xs`` is far, then like
    the training data, then half and half, so the relayed verdict lets only
    those examples cut.

    Returns:
      ``(running, xs, zs, first, second, own)``: the float64 memories (mean,
      var, count) after each batch of the first layer, of the second with the
      first's verdict, and of the second with its own (for a test's power).
    """
    from tests.np_reference import np_stream, np_verdicts

    rng = np.random.default_rng(seed)
    mean = np.array([-1.0, 0.0, 0.5])
    var = np.array([0.5, 1.0, 2.0])
    shape = (6, 2, 2, 3)
    near = [mean + np.sqrt(var) * rng.normal(size=shape) for _ in range(3)]
    far = [rng.normal(3.0, 2.5, shape) for _ in range(2)]
    xs = [far[0], near[0], near[1], np.concatenate([near[2][:3], far[1][3:]])]
    zs = [rng.normal(-4.0, 3.0, shape) for _ in xs]
    xs, zs = ([v.astype(np.float32) for v in vs] for vs in (xs, zs))
    verdicts = np_verdicts(xs, mean, var, gate=RELAY.gate)
    ones, zeros = np.ones(3), np.zeros(3)
    masks = [None] * len(xs)
    mode = (RELAY.horizon, RELAY.prior, RELAY.surprise, RELAY.anchor)
    args = (ones, zeros, mean, var, *mode)  # scale, bias, the training statistics, the mode
    _, first = np_stream(xs, masks, *args, gate=RELAY.gate)
    _, second = np_stream(zs, masks, *args, verdicts=verdicts)
    _, own = np_stream(zs, masks, *args, gate=RELAY.gate)
    assert max(abs(a[0][0] - b[0][0]) for a, b in zip(second, own, strict=True)) > 1.0
    running = (mean.astype(np.float32), var.astype(np.float32))
    first, second, own = ([(mu, v, n) for n, mu, v in ms] for ms in (first, second, own))
    return running, xs, zs, first, second, own
