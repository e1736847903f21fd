"""jbn.equinox.fold_batch_norms: Equinox models (output-first kernels) folded, against the
original model's own inference-mode outputs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn.equinox


class CNN(eqx.Module):
    """A plain conv (no bias), a depthwise conv (bias), a transposed conv and a linear layer,
    each with a batch norm (Equinox's in both modes, and jbn's), and one after an add."""

    conv: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    depthwise: eqx.nn.Conv2d
    bn2: jbn.equinox.BatchNorm
    up: eqx.nn.ConvTranspose2d
    bn3: eqx.nn.BatchNorm
    linear: eqx.nn.Linear
    bn4: eqx.nn.BatchNorm
    after_add: eqx.nn.BatchNorm
    residual: bool = eqx.field(static=True)

    def __init__(self, residual=False):
        k = jax.random.split(jax.random.key(0), 4)
        self.conv = eqx.nn.Conv2d(2, 4, 3, use_bias=False, key=k[0])
        self.bn1 = eqx.nn.BatchNorm(4, "batch", mode="batch")
        self.depthwise = eqx.nn.Conv2d(4, 4, 3, groups=4, key=k[1])
        self.bn2 = jbn.equinox.BatchNorm(4, "batch")
        self.up = eqx.nn.ConvTranspose2d(4, 3, 2, use_bias=False, key=k[2])
        self.bn3 = eqx.nn.BatchNorm(3, "batch", eps=1e-3, mode="ema")
        self.linear = eqx.nn.Linear(3, 5, key=k[3])
        self.bn4 = eqx.nn.BatchNorm(5, "batch", mode="batch")
        self.after_add = eqx.nn.BatchNorm(5, "batch", mode="ema")
        self.residual = residual

    def __call__(self, x, state):
        x, state = self.bn1(self.conv(x), state)
        y = self.depthwise(jax.nn.relu(x))
        x, state = self.bn2(y, state)
        x = x + y if self.residual else x
        x, state = self.bn3(self.up(x), state)
        x = jnp.mean(jax.nn.relu(x), axis=(1, 2))
        x, state = self.bn4(self.linear(x), state)
        return self.after_add(x + 1.0, state)


def _trained(residual=False):
    """Random running statistics and weights set directly; Equinox's mode='batch' counter is 3,
    so its debiasing (1 - m^3) is far from 1."""
    model, state = eqx.nn.make_with_state(CNN)(residual)
    rng = np.random.default_rng(1)

    def normal(shape, scale=1.0, shift=0.0):
        return jnp.asarray(rng.normal(shift, scale, shape), jnp.float32)

    def var(shape):
        return jnp.asarray(rng.uniform(0.2, 3.0, shape), jnp.float32)

    bns = [model.bn1, model.bn2, model.bn3, model.bn4, model.after_add]
    model = eqx.tree_at(
        lambda m: [
            w for b in (m.bn1, m.bn2, m.bn3, m.bn4, m.after_add) for w in (b.weight, b.bias)
        ],
        model,
        [normal(b.weight.shape, *ab) for b in bns for ab in ((0.5, 1.0), (0.5, 0.0))],
    )
    for bn in bns:
        c = (bn.input_size,)
        if isinstance(bn, jbn.equinox.BatchNorm):
            stored = state.get(bn.state_index)
            state = state.set(bn.state_index, {**stored, "mean": normal(c), "var": var(c)})
        elif bn.mode == "batch":
            state = state.set(bn.batch_counter, state.get(bn.batch_counter) + 3)
            state = state.set(bn.batch_state_index, (normal(c, 0.3), var(c) * 0.3))
        else:
            state = state.set(bn.ema_first_time_index, jnp.array(False))
            state = state.set(bn.ema_state_index, (normal(c), var(c)))
    return model, state


X = jax.random.normal(jax.random.key(9), (4, 2, 6, 6))


def _infer(model, state, x):
    run = jax.vmap(
        eqx.nn.inference_mode(model), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )
    return run(x, state)[0]


@pytest.fixture(scope="module")
def trained():
    return _trained()


def test_cnn_folds_to_its_inference_outputs(trained):
    model, state = trained
    result = jbn.equinox.fold_batch_norms(model, state, X)
    folded, folded_state = result
    assert result.report.folded == (
        ("CNN.conv", "CNN.bn1"),
        ("CNN.depthwise", "CNN.bn2"),
        ("CNN.up", "CNN.bn3"),
        ("CNN.linear", "CNN.bn4"),
    )
    assert list(result.report.left) == ["CNN.after_add"]
    bns = [m for m in jax.tree.leaves(folded, is_leaf=lambda n: isinstance(n, eqx.nn.BatchNorm))]
    assert sum(isinstance(m, (eqx.nn.BatchNorm, jbn.equinox.BatchNorm)) for m in bns) == 1
    assert folded.conv.use_bias and folded.conv.bias.shape == (4, 1, 1)
    # Only the batch norm left keeps state entries.
    assert len(jax.tree.leaves(folded_state)) == 3
    x2 = jax.random.normal(jax.random.key(3), (3, 2, 6, 6))
    infer = eqx.filter_jit(_infer)
    y_ref = np.asarray(infer(model, state, x2))
    np.testing.assert_allclose(
        infer(folded, folded_state, x2), y_ref, atol=1e-4 * np.abs(y_ref).max()
    )


def test_converted_sequential_folds():
    """jbn.equinox.convert's model folds, inside eqx.nn.Sequential."""
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(3, 5, use_bias=False, key=jax.random.key(0)),
            eqx.nn.BatchNorm(5, "batch", mode="ema"),
        ]
    )
    x = jax.random.normal(jax.random.key(4), (4, 3))
    state = state.set(seq.layers[1].ema_first_time_index, jnp.array(False))
    state = state.set(
        seq.layers[1].ema_state_index, (x[:, :1].T.repeat(5, 0)[:, 0], jnp.ones(5) * 2)
    )
    converted, conv_state = jbn.equinox.convert(seq, state, allow_ema=True)
    folded, folded_state = jbn.equinox.fold_batch_norms(converted, conv_state, x)
    assert not jax.tree.leaves(folded_state)
    np.testing.assert_allclose(
        _infer(folded, folded_state, x), _infer(seq, state, x), rtol=1e-5, atol=1e-5
    )


def test_mismatch_is_refused_with_the_difference():
    model, state = _trained(residual=True)
    with pytest.raises(ValueError, match=r"differs from the original by \d"):
        jbn.equinox.fold_batch_norms(model, state, X)


def test_errors(trained):
    model, state = trained
    linear = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="ran no batch norm"):
        jbn.equinox.fold_batch_norms(
            linear,
            eqx.nn.State(linear),
            X[:, 0, 0, :3],
            forward=lambda m, s, x: (jax.vmap(m)(x), s),
        )
    with pytest.raises(TypeError, match="state must be the model's eqx.nn.State"):
        jbn.equinox.fold_batch_norms(model, {}, X)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="forward must be callable"):
        jbn.equinox.fold_batch_norms(model, state, X, forward=1)  # pyright: ignore[reportArgumentType]
