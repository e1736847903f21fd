"""jbn.equinox against eqx.nn.BatchNorm(mode="batch") and float64 NumPy references."""

import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")
import jbn.equinox as je  # noqa: E402

C = 3
MOMENTUM = 0.9
VMAP = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def _affine(bn, key):
    """The layer with a random weight and bias (the same for the same key)."""
    k1, k2 = jax.random.split(key)
    return eqx.tree_at(
        lambda b: (b.weight, b.bias),
        bn,
        (1.0 + jax.random.normal(k1, (C,)), jax.random.normal(k2, (C,))),
    )


class MLP(eqx.Module):
    """Per-example MLP: Linear -> batch norm -> tanh -> Linear, x of shape (4,)."""

    lin1: eqx.nn.Linear
    bn: eqx.Module
    lin2: eqx.nn.Linear

    def __init__(self, bn_cls, key, **kwargs):
        k1, k2, k3 = jax.random.split(key, 3)
        self.lin1 = eqx.nn.Linear(4, C, key=k1)
        self.bn = _affine(bn_cls(C, "batch", momentum=MOMENTUM, **kwargs), k3)
        self.lin2 = eqx.nn.Linear(C, 2, key=k2)

    def __call__(self, x, state):
        x, state = self.bn(self.lin1(x), state)
        return self.lin2(jnp.tanh(x)), state


class CNN(eqx.Module):
    """Per-example CNN: Conv2d -> batch norm -> tanh -> mean -> Linear, x of shape (2, 5, 4)."""

    conv: eqx.nn.Conv2d
    bn: eqx.Module
    lin: eqx.nn.Linear

    def __init__(self, bn_cls, key, **kwargs):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv2d(2, C, 3, padding=1, key=k1)
        self.bn = _affine(bn_cls(C, "batch", momentum=MOMENTUM, **kwargs), k3)
        self.lin = eqx.nn.Linear(C, 2, key=k2)

    def __call__(self, x, state):
        x, state = self.bn(self.conv(x), state)
        return self.lin(jnp.mean(jnp.tanh(x), axis=(1, 2))), state


SHAPES = {MLP: (4,), CNN: (2, 5, 4)}


def _eqx_bn(*args, **kwargs):
    return eqx.nn.BatchNorm(*args, mode="batch", **kwargs)


def _make(model_cls, bn_cls, key=0, **kwargs):
    return eqx.nn.make_with_state(model_cls)(bn_cls, jax.random.key(key), **kwargs)


def _data(shape, batch=8, key=1, offset=1.0):
    return offset + 2.0 * jax.random.normal(jax.random.key(key), (batch, *shape))


def _loss(model, state, x):
    out, state = jax.vmap(model, **VMAP)(x, state)
    return jnp.sum(jnp.sin(out)), (out, state)


@eqx.filter_jit
def _loss_and_grads(model, state, x):
    """((loss, (out, state)), (model gradient, x gradient)): one compilation per model type."""
    return eqx.filter_value_and_grad(lambda mx: _loss(mx[0], state, mx[1]), has_aux=True)(
        (model, x)
    )


def _loss_and_grad(model, state, x):
    value, (grads, _) = _loss_and_grads(model, state, x)
    return value, grads


def _infer(model, state, x):
    return jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None))(x, state)


_infer_jit = eqx.filter_jit(_infer)


@eqx.filter_jit
def _infer_grad(model, state, x):
    return eqx.filter_grad(lambda m: jnp.sum(jnp.sin(_infer(m, state, x)[0])))(model)


def _arrays(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


def _assert_trees_close(a, b, rtol, atol=0.0):
    la, lb = _arrays(a), _arrays(b)
    assert len(la) == len(lb) > 0
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _ref_running(t, batch_means, batch_vars, m):
    """Equinox's mode="batch" inference statistics after t steps, from its formula, in float64."""
    hm, hv = np.zeros(C), np.ones(C)
    for bm, bv in zip(batch_means[:t], batch_vars[:t], strict=True):
        hm, hv = m * hm + (1 - m) * bm, m * hv + (1 - m) * bv
    return hm / (1 - m**t), hv / (1 - m**t)


def _batch_stats64(h):
    """Per-channel mean and biased variance of a batch of per-example activations (B, C, ...)."""
    h = np.moveaxis(np.asarray(h, np.float64), 1, 0).reshape(C, -1)
    return h.mean(1), h.var(1)


# --------------------------------------------------------------------------- #
# Against eqx.nn.BatchNorm(mode="batch").
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("model_cls", [MLP, CNN])
def test_train_matches_equinox(model_cls):
    ref, ref_state = _make(model_cls, _eqx_bn)
    model, state = _make(model_cls, je.BatchNorm)
    x = _data(SHAPES[model_cls])
    (l_ref, (y_ref, ref_state1)), (g_ref, gx_ref) = _loss_and_grads(ref, ref_state, x)
    (l_jbn, (y_jbn, state1)), (g_jbn, gx_jbn) = _loss_and_grads(model, state, x)
    np.testing.assert_allclose(y_jbn, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l_jbn, l_ref, rtol=1e-5)
    _assert_trees_close(g_jbn, g_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gx_jbn, gx_ref, rtol=1e-4, atol=1e-6)

    # Running statistics after one step: the batch's own mean and variance (float64
    # NumPy), which is Equinox's debiased mean; its variance is m/(1-m) = 9 too high.
    h = jax.vmap(model.lin1 if model_cls is MLP else model.conv)(x)
    mean64, var64 = _batch_stats64(h)
    run = state1.get(model.bn.state_index)
    assert int(run["count"]) == 1
    np.testing.assert_allclose(run["mean"], mean64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run["var"], var64, rtol=1e-5)
    hm, hv = ref_state1.get(ref.bn.batch_state_index)
    np.testing.assert_allclose(run["mean"], hm / (1 - MOMENTUM), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        hv / (1 - MOMENTUM) - run["var"], MOMENTUM / (1 - MOMENTUM), rtol=1e-5
    )


@pytest.mark.parametrize("model_cls", [MLP, CNN])
def test_inference_matches_equinox(model_cls):
    ref, ref_state = _make(model_cls, _eqx_bn)
    model, state = _make(model_cls, je.BatchNorm)
    x = _data(SHAPES[model_cls], key=2)
    # Before any training step both use mean 0, variance 1.
    np.testing.assert_allclose(
        _infer_jit(model, state, x)[0], _infer_jit(ref, ref_state, x)[0], rtol=1e-5, atol=1e-6
    )
    # After three steps they differ only by Equinox's variance bias m^t: remove it
    # from Equinox's hidden variance and the outputs and gradients agree.
    for step in range(3):
        batch = _data(SHAPES[model_cls], key=10 + step, offset=step)
        ref_state = _loss_and_grad(ref, ref_state, batch)[0][1][1]
        state = _loss_and_grad(model, state, batch)[0][1][1]
    y_ref_biased = _infer_jit(ref, ref_state, x)[0]
    hm, hv = ref_state.get(ref.bn.batch_state_index)
    ref_state = ref_state.set(ref.bn.batch_state_index, (hm, hv - MOMENTUM**3))
    y_ref, _ = _infer_jit(ref, ref_state, x)
    y_jbn, state_after = _infer_jit(model, state, x)
    np.testing.assert_allclose(y_jbn, y_ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_jbn, y_ref_biased, rtol=1e-3)
    # Inference leaves the state alone.
    for k, v in state.get(model.bn.state_index).items():
        np.testing.assert_array_equal(state_after.get(model.bn.state_index)[k], v)
    g_ref = _infer_grad(ref, ref_state, x)
    g_jbn = _infer_grad(model, state, x)
    _assert_trees_close(g_jbn, g_ref, rtol=1e-4, atol=1e-6)


def _running_after_each_step(bn, state, xs):
    """Trains bn alone on each batch of xs (T, B, C) in a lax.scan.

    Returns the running (mean, var) used at inference after each step, (T, C) each:
    jbn's stored statistics, or Equinox's hidden ones divided by 1 - m^t.
    """

    def step(state, x):
        _, state = jax.vmap(bn, **VMAP)(x, state)
        if isinstance(bn, je.BatchNorm):
            run = state.get(bn.state_index)
            return state, (run["mean"], run["var"])
        hm, hv = state.get(bn.batch_state_index)
        debias = 1 - bn.momentum ** state.get(bn.batch_counter)
        return state, (hm / debias, hv / debias)

    return jax.lax.scan(step, state, xs)[1]


def test_running_statistics_over_500_steps():
    m, steps = 0.99, 500
    xs = jax.random.normal(jax.random.key(3), (steps, 4, C)) * jnp.array([[[1.0, 2.0, 0.5]]])
    xs = xs + jnp.linspace(-1.0, 1.0, steps)[:, None, None]  # drifting statistics
    ref, ref_state = eqx.nn.make_with_state(_eqx_bn)(C, "batch", momentum=m)
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", momentum=m)
    ref_mean, ref_var = eqx.filter_jit(_running_after_each_step)(ref, ref_state, xs)
    mean, var = eqx.filter_jit(_running_after_each_step)(bn, state, xs)
    means = np.asarray(xs, np.float64).mean(1)
    variances = np.asarray(xs, np.float64).var(1)
    for t, bias in ((1, 99.0), (10, 9.46), (100, 0.58), (500, 0.0066)):
        # jbn: the batch statistics' average with weights m^(t-i) (1-m) / (1-m^t), in float64.
        weights = m ** np.arange(t - 1, -1, -1) * (1 - m) / (1 - m**t)
        np.testing.assert_allclose(mean[t - 1], weights @ means[:t], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[t - 1], weights @ variances[:t], rtol=1e-4)
        # Equinox: the same mean (its formula, in float64, and as it runs); its
        # variance is m^t/(1-m^t) higher, from its hidden variance's initial 1.
        ref_mean64, ref_var64 = _ref_running(t, means, variances, m)
        np.testing.assert_allclose(ref_mean[t - 1], ref_mean64, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mean[t - 1], ref_mean[t - 1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ref_var64 - weights @ variances[:t], m**t / (1 - m**t))
        np.testing.assert_allclose(ref_var[t - 1] - var[t - 1], bias, rtol=1e-2)


# --------------------------------------------------------------------------- #
# Nested maps and devices.
# --------------------------------------------------------------------------- #


def test_ensemble_vmap_of_vmap():
    """Outer vmap over ensemble members (batched model and state), inner vmap named "batch"."""
    members = [_make(MLP, je.BatchNorm, key=k) for k in (0, 5)]
    stacked = jax.tree.map(
        lambda *a: jnp.stack(a), *[eqx.filter(m, eqx.is_array) for m, _ in members]
    )
    model = eqx.combine(stacked, eqx.filter(members[0][0], eqx.is_array, inverse=True))
    state = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in members])
    x = jnp.stack([_data((4,), key=6), _data((4,), key=7, offset=-2.0)])

    def run(model, state, x):
        (loss, (out, state)), grads = eqx.filter_value_and_grad(_loss, has_aux=True)(
            model, state, x
        )
        return out, state, grads

    out, new_state, grads = eqx.filter_jit(eqx.filter_vmap(run))(model, state, x)
    for i, (m, s) in enumerate(members):
        (_, (out_i, state_i)), grads_i = _loss_and_grad(m, s, x[i])
        np.testing.assert_allclose(out[i], out_i, rtol=1e-5, atol=1e-6)
        member_grads = jax.tree.map(lambda a, i=i: a[i], grads)
        _assert_trees_close(member_grads, grads_i, rtol=1e-4, atol=1e-6)
        run_i = state_i.get(m.bn.state_index)
        for k in ("mean", "var", "count"):
            np.testing.assert_allclose(new_state.get(m.bn.state_index)[k][i], run_i[k], rtol=1e-5)
    # Each member has its own statistics.
    assert not np.allclose(new_state.get(model.bn.state_index)["mean"][0],
                           new_state.get(model.bn.state_index)["mean"][1])  # fmt: skip


def _whole_batch(model, state, x):
    (loss, (out, state)), grads = _loss_and_grad(model, state, x)
    return loss, out, state.get(model.bn.state_index), grads


def _assert_same_as_whole_batch(model, state, x, loss, out, run, grads):
    loss1, out1, run1, grads1 = _whole_batch(model, state, x)
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    np.testing.assert_allclose(out.reshape(out1.shape), out1, rtol=1e-5, atol=1e-6)
    for k in ("mean", "var", "count"):
        np.testing.assert_allclose(run[k], run1[k], rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads, grads1, rtol=1e-4, atol=1e-6)


def test_tuple_axis_name_over_nested_vmaps():
    model, state = _make(CNN, je.BatchNorm)
    model = eqx.tree_at(lambda m: m.bn, model, _rename(model.bn, ("outer", "inner")))
    x = _data(SHAPES[CNN])

    def loss(model, state, x):
        inner = jax.vmap(model, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
        out, state = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))(
            x.reshape(2, 4, *x.shape[1:]), state
        )
        return jnp.sum(jnp.sin(out)), (out, state)

    loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (l2, (out2, state2)), g2 = loss_and_grad(model, state, x)
    flat, flat_state = _make(CNN, je.BatchNorm)
    _assert_same_as_whole_batch(flat, flat_state, x, l2, out2, state2.get(model.bn.state_index), g2)


def _rename(bn, axis_name):
    """The same layer (same parameters and state index) with another axis_name."""
    new = je.BatchNorm(C, axis_name, momentum=bn.momentum)
    return eqx.tree_at(
        lambda b: (b.weight, b.bias, b.state_index), new, (bn.weight, bn.bias, bn.state_index)
    )


def test_pmap_over_four_devices(four_devices):
    model, state = _make(CNN, je.BatchNorm)
    model = eqx.tree_at(lambda m: m.bn, model, _rename(model.bn, ("dev", "batch")))
    x = _data(SHAPES[CNN])

    def per_device(model, state, x):
        (loss, (out, state)), grads = eqx.filter_value_and_grad(_loss, has_aux=True)(
            model, state, x
        )
        return jax.lax.psum(loss, "dev"), out, state, jax.lax.psum(grads, "dev")

    params, static = eqx.partition(model, eqx.is_array)
    loss, out, new_state, grads = jax.pmap(
        lambda p, s, x: per_device(eqx.combine(p, static), s, x),
        axis_name="dev",
        in_axes=(None, None, 0),
        devices=four_devices,
    )(params, state, x.reshape(4, 2, *x.shape[1:]))
    run = jax.tree.map(lambda a: a[0], new_state.get(model.bn.state_index))
    flat, flat_state = _make(CNN, je.BatchNorm)
    _assert_same_as_whole_batch(
        flat, flat_state, x, loss[0], out, run, jax.tree.map(lambda a: a[0], grads)
    )


@pytest.mark.parametrize("per_device", [1, 2])
def test_shard_map_over_four_devices(four_devices, per_device):
    """One example per device (axis_name="dev"), or a vmap inside (("dev", "batch"))."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    model, state = _make(CNN, je.BatchNorm)
    x = _data(SHAPES[CNN], batch=4 * per_device)
    names = "dev" if per_device == 1 else ("dev", "batch")
    model = eqx.tree_at(lambda m: m.bn, model, _rename(model.bn, names))
    mesh = Mesh(np.array(four_devices), ("dev",))
    params, static = eqx.partition(model, eqx.is_array)

    def sharded(params, state, x):
        model = eqx.combine(params, static)
        if per_device == 1:
            out, state = model(x[0], state)
            out = out[None]
        else:
            out, state = jax.vmap(model, **VMAP)(x, state)
        return jax.lax.psum(jnp.sum(jnp.sin(out)), "dev"), (out, state)

    # JAX 0.10 cannot type a psum over a vmap axis inside shard_map: with a vmap
    # inside, turn the varying-axes check off.
    loss = jax.shard_map(
        sharded,
        mesh=mesh,
        in_specs=(P(), P(), P("dev")),
        out_specs=(P(), (P("dev"), P())),
        check_vma=per_device == 1,
    )
    (l4, (out4, state4)), g4 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, state, x)
    flat, flat_state = _make(CNN, je.BatchNorm)
    _assert_same_as_whole_batch(flat, flat_state, x, l4, out4, state4.get(model.bn.state_index), g4)


# --------------------------------------------------------------------------- #
# Equinox integration.
# --------------------------------------------------------------------------- #


@eqx.filter_jit
def _apply(model, state, x, inference=None):
    """The layer over a batch, with the call-time flag (static under filter_jit)."""
    return jax.vmap(lambda x, s: model(x, s, inference=inference), **VMAP)(x, state)


def test_inference_flag_both_ways():
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch")
    x = _data((C, 2))
    y, state = _apply(bn, state, x)
    run = state.get(bn.state_index)
    # inference_mode: running statistics, state unchanged, no named axis needed.
    inf = eqx.nn.inference_mode(bn)
    assert inf.inference and not bn.inference
    y_inf, state = _apply(inf, state, x)
    expected = (np.asarray(x, np.float64) - np.asarray(run["mean"])[:, None]) / np.sqrt(
        np.asarray(run["var"])[:, None] + 1e-5
    )
    np.testing.assert_allclose(y_inf, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state.get(bn.state_index)["mean"], run["mean"])
    y0, state = inf(x[0], state)  # one example, no vmap at all
    np.testing.assert_allclose(y0, y_inf[0], rtol=1e-6)
    # The call-time flag wins both ways.
    y_over, state = _apply(bn, state, x, inference=True)
    np.testing.assert_allclose(y_over, y_inf, rtol=1e-6)
    y_train, state = _apply(inf, state, x, inference=False)
    np.testing.assert_allclose(y_train, y, rtol=1e-6)
    assert int(state.get(bn.state_index)["count"]) == 2
    back = eqx.nn.inference_mode(inf, value=False)
    assert not back.inference
    y_back, state = _apply(back, state, x)
    np.testing.assert_allclose(y_back, y, rtol=1e-6)
    assert int(state.get(bn.state_index)["count"]) == 3


def test_sequential_and_static_axis_name():
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(4, C, key=jax.random.key(0)),
            je.BatchNorm(C, ["batch"]),
            eqx.nn.Lambda(jax.nn.relu),
        ]
    )
    bn = seq.layers[1]
    assert bn.axis_name == ("batch",)  # a list becomes a (hashable) tuple
    assert bn.is_stateful()
    # axis_name and the settings are static: not leaves, so jax.jit takes the model.
    assert all(eqx.is_array(leaf) or isinstance(leaf, bool) for leaf in jax.tree.leaves(bn))
    x = _data((4,))
    y, state = jax.jit(jax.vmap(seq, **VMAP))(x, state)
    h = np.asarray(jax.vmap(seq.layers[0])(x), np.float64)
    expected = np.maximum((h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5), 0.0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert int(state.get(bn.state_index)["count"]) == 1


def test_serialise_round_trip(tmp_path):
    model, state = _make(CNN, je.BatchNorm)
    state = _loss_and_grad(model, state, _data(SHAPES[CNN]))[0][1][1]
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, (model, state))
    fresh, fresh_state = _make(CNN, je.BatchNorm, key=9)
    loaded, loaded_state = eqx.tree_deserialise_leaves(path, (fresh, fresh_state))
    _assert_trees_close(loaded, model, rtol=0)
    run, back = state.get(model.bn.state_index), loaded_state.get(loaded.bn.state_index)
    for k in ("mean", "var", "count"):
        np.testing.assert_array_equal(back[k], run[k])
    x = _data(SHAPES[CNN], key=4)
    np.testing.assert_array_equal(_infer_jit(loaded, loaded_state, x)[0],
                                  _infer_jit(model, state, x)[0])  # fmt: skip


# --------------------------------------------------------------------------- #
# convert.
# --------------------------------------------------------------------------- #


class Nested(eqx.Module):
    """Batch norms in a list, in a Sequential and in a sub-module."""

    blocks: list
    head: eqx.nn.Sequential
    cnn: CNN

    def __init__(self, bn_cls, key, **kwargs):
        k1, k2, k3 = jax.random.split(key, 3)
        self.cnn = CNN(bn_cls, k1, **kwargs)
        self.blocks = [
            eqx.nn.Linear(2, C, key=k2),
            _affine(bn_cls(C, "batch", momentum=0.8, **kwargs), k2),
        ]
        self.head = eqx.nn.Sequential(
            [
                eqx.nn.Lambda(jnp.tanh),
                eqx.nn.Linear(C, C, key=k3),
                bn_cls(C, "batch", channelwise_affine=False, momentum=0.5, **kwargs),
            ]
        )

    def __call__(self, x, state):
        h, state = self.cnn(x, state)
        h, state = self.blocks[1](self.blocks[0](h), state)
        return self.head(h, state)


def test_convert_nested_model():
    ref, ref_state = eqx.nn.make_with_state(Nested)(_eqx_bn, jax.random.key(0))
    x = _data(SHAPES[CNN])
    for step in range(2):  # some running statistics to carry over
        ref_state = _loss_and_grad(ref, ref_state, _data(SHAPES[CNN], key=20 + step))[0][1][1]
    ref = eqx.tree_at(lambda m: m.cnn.bn.inference, ref, True)
    model, state = je.convert(ref, ref_state)

    bns = [model.cnn.bn, model.blocks[1], model.head.layers[2]]
    assert all(isinstance(b, je.BatchNorm) for b in bns)
    assert not any(isinstance(n, eqx.nn.BatchNorm) for n in jax.tree.leaves(
        model, is_leaf=lambda n: isinstance(n, eqx.nn.BatchNorm)))  # fmt: skip
    assert [b.inference for b in bns] == [True, False, False]
    assert bns[2].weight is None and bns[2].momentum == 0.5
    np.testing.assert_array_equal(bns[1].weight, ref.blocks[1].weight)
    for bn, old in zip(bns, [ref.cnn.bn, ref.blocks[1], ref.head.layers[2]], strict=True):
        run = state.get(bn.state_index)
        t = int(ref_state.get(old.batch_counter))
        hm, hv = ref_state.get(old.batch_state_index)
        m = old.momentum
        assert int(run["count"]) == t == 2
        np.testing.assert_allclose(run["mean"], hm / (1 - m**t), rtol=1e-5, atol=1e-6)
        # Equinox's variance sits under its initial 1 (m^t): float32 keeps it to about
        # ulp(1) / (1 - m^t), e.g. 3e-6 at m = 0.99, t = 2.
        np.testing.assert_allclose(run["var"], (hv - m**t) / (1 - m**t), rtol=1e-5, atol=1e-5)

    # Same loss, outputs, gradients and running-statistics update afterwards.
    ref_train = eqx.nn.inference_mode(ref, value=False)
    (l_ref, (y_ref, ref_state2)), g_ref = _loss_and_grad(ref_train, ref_state, x)
    train = eqx.nn.inference_mode(model, value=False)
    (l_jbn, (y_jbn, state2)), g_jbn = _loss_and_grad(train, state, x)
    np.testing.assert_allclose(l_jbn, l_ref, rtol=1e-5)
    np.testing.assert_allclose(y_jbn, y_ref, rtol=1e-5, atol=1e-5)
    # atol: the gradient of a bias before a batch norm is 0 up to rounding (~1e-5 here).
    _assert_trees_close(g_jbn, g_ref, rtol=1e-4, atol=2e-5)
    # Inference too, once Equinox's variance bias m^t is taken out of its state.
    ref_inf, inf = eqx.nn.inference_mode(ref), eqx.nn.inference_mode(model)
    fixed = ref_state2
    for old in (ref.cnn.bn, ref.blocks[1], ref.head.layers[2]):
        hm, hv = fixed.get(old.batch_state_index)
        fixed = fixed.set(old.batch_state_index, (hm, hv - old.momentum**3))
    # Loose: the small variances here (~1e-3) sit under m^t in Equinox's float32
    # hidden variance, which holds them only to ~1e-4 relative.
    np.testing.assert_allclose(
        _infer_jit(inf, state2, x)[0], _infer_jit(ref_inf, fixed, x)[0], rtol=1e-3, atol=1e-4
    )


def test_convert_at_initialisation_gives_equal_inference_and_keeps_other_state():
    class WithSpectral(eqx.Module):
        sn: eqx.nn.SpectralNorm
        bn: eqx.nn.BatchNorm

        def __init__(self, key):
            self.sn = eqx.nn.SpectralNorm(eqx.nn.Linear(C, C, key=key), "weight", key=key)
            self.bn = _eqx_bn(C, "batch")

        def __call__(self, x, state):
            x, state = self.sn(x, state)
            return self.bn(x, state)

    ref, ref_state = eqx.nn.make_with_state(WithSpectral)(jax.random.key(0))
    model, state = je.convert(ref, ref_state)
    x = _data((C,))
    np.testing.assert_allclose(_infer_jit(model, state, x)[0], _infer_jit(ref, ref_state, x)[0],
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(
        state.get(model.sn.uv_index)[0], ref_state.get(ref.sn.uv_index)[0]
    )


def test_convert_ema_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox's "legacy" mode warning
        ref, ref_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch")
    with pytest.raises(ValueError, match="mode='ema'.*allow_ema=True"):
        je.convert(ref, ref_state)
    x = _data((C,))
    _, ref_state = _apply(ref, ref_state, x)
    model, state = je.convert(ref, ref_state, allow_ema=True, residual="output")
    assert model.residual == "output"
    assert int(state.get(model.state_index)["count"]) > 0
    np.testing.assert_allclose(_infer_jit(model, state, x)[0], _infer_jit(ref, ref_state, x)[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip


# --------------------------------------------------------------------------- #
# jbn's options through the layer.
# --------------------------------------------------------------------------- #


def test_mask_leaves_padding_out():
    """Two padding examples (mask=False) change nothing for the eight real ones."""
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", momentum=MOMENTUM)
    bn = _affine(bn, jax.random.key(3))
    x = _data((C, 2))
    padded = jnp.concatenate([x, 100.0 + x[:2]])
    mask = jnp.arange(10) < 8

    def loss(bn, x, mask):
        y, s = jax.vmap(lambda x, m, s: bn(x, s, mask=m), axis_name="batch",
                        in_axes=(0, 0, None), out_axes=(0, None))(x, mask, state)  # fmt: skip
        return jnp.sum(jnp.sin(y) * mask[:, None, None]), (y, s)

    loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (l_pad, (y_pad, s_pad)), g_pad = loss_and_grad(bn, padded, mask)
    (l_ref, (y_ref, s_ref)), g_ref = loss_and_grad(bn, x, jnp.ones(8, bool))
    np.testing.assert_allclose(l_pad, l_ref, rtol=1e-5)
    np.testing.assert_allclose(y_pad[:8], y_ref, rtol=1e-5, atol=1e-6)
    _assert_trees_close(g_pad, g_ref, rtol=1e-4, atol=1e-6)
    for k in ("mean", "var"):
        np.testing.assert_allclose(s_pad.get(bn.state_index)[k], s_ref.get(bn.state_index)[k],
                                   rtol=1e-5)  # fmt: skip
    mean64, var64 = _batch_stats64(x)
    np.testing.assert_allclose(s_pad.get(bn.state_index)["var"], var64, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_ghost_batches_equal_separate_groups(padded):
    """virtual_batch_size=4 on 8 examples equals the plain layer on each half on its own."""
    ghost, state = eqx.nn.make_with_state(je.BatchNorm)(
        C, "batch", momentum=MOMENTUM, virtual_batch_size=4
    )
    ghost = _affine(ghost, jax.random.key(4))
    plain = _affine(je.BatchNorm(C, "batch", momentum=MOMENTUM), jax.random.key(4))
    plain = eqx.tree_at(lambda b: b.state_index, plain, ghost.state_index)
    x = _data((C, 2), offset=0.0) + jnp.repeat(jnp.array([0.0, 3.0]), 4)[:, None, None]
    mask = jnp.arange(8) != (7 if padded else 8)  # padded: the last example is padding

    @eqx.filter_jit
    def run(bn, x, mask):
        def loss(bn):
            y, s = jax.vmap(lambda x, m, s: bn(x, s, mask=m), axis_name="batch",
                            in_axes=(0, 0, None), out_axes=(0, None))(x, mask, state)  # fmt: skip
            return jnp.sum(jnp.sin(y) * mask[:, None, None]), (y, s.get(bn.state_index))

        return eqx.filter_value_and_grad(loss, has_aux=True)(bn)

    (loss, (y, run_g)), grads = run(ghost, x, mask)
    halves = [run(plain, x[:4], mask[:4]), run(plain, x[4:], mask[4:])]
    np.testing.assert_allclose(loss, sum(h[0][0] for h in halves), rtol=1e-5)
    y_ref = jnp.concatenate([h[0][1][0] for h in halves])
    np.testing.assert_allclose(y[mask], y_ref[mask], rtol=1e-5, atol=1e-6)
    grads_ref = jax.tree.map(lambda a, b: a + b, halves[0][1], halves[1][1])
    _assert_trees_close(grads, grads_ref, rtol=1e-4, atol=1e-6)
    # Running statistics: the count-weighted mean of the groups' (4 and 3 or 4 examples).
    counts = np.array([4.0, 3.0 if padded else 4.0])
    for k in ("mean", "var"):
        expected = sum(c * h[0][1][1][k] for c, h in zip(counts, halves, strict=True))
        np.testing.assert_allclose(run_g[k], expected / counts.sum(), rtol=1e-5, atol=1e-6)
    # And the outputs in float64 NumPy: each half normalized with its own statistics.
    x64 = np.asarray(x, np.float64)
    for rows in (slice(0, 4), slice(4, 7 if padded else 8)):
        mean, var = _batch_stats64(x64[rows])
        xhat = (x64[rows] - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
        expected = xhat * np.asarray(ghost.weight)[:, None] + np.asarray(ghost.bias)[:, None]
        np.testing.assert_allclose(y[rows], expected, rtol=1e-5, atol=1e-5)


def test_cumulative_and_unbiased_running_statistics():
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(
        C, "batch", momentum=None, unbiased_running_var=True
    )
    train = jax.jit(jax.vmap(bn, **VMAP))
    xs = [_data((C,), batch=5, key=k, offset=k) for k in range(3)]
    for x in xs:
        _, state = train(x, state)
    run = state.get(bn.state_index)
    x64 = np.asarray(xs, np.float64)
    assert int(run["count"]) == 3
    np.testing.assert_allclose(run["mean"], x64.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(run["var"], x64.var(1, ddof=1).mean(0), rtol=1e-5)


@pytest.mark.parametrize("autodiff", [False, True])
def test_training_goes_through_the_analytic_backward(autodiff):
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", autodiff=autodiff)
    x = _data((C, 2))
    jaxpr = str(jax.make_jaxpr(lambda x: jax.vmap(bn, **VMAP)(x, state)[0])(x))
    assert ("custom_vjp" in jaxpr) != autodiff


@pytest.mark.parametrize(
    "options", [dict(residual="output"), dict(autodiff=True), dict(renorm=True, rmax=1.5)]
)
def test_options_keep_the_batch_norm_gradient(options):
    """residual="output", autodiff and (at the first step) renorm give Equinox's gradients."""
    ref, ref_state = _make(CNN, _eqx_bn)
    model, state = _make(CNN, je.BatchNorm, **options)
    x = _data(SHAPES[CNN])
    (l_ref, _), g_ref = _loss_and_grad(ref, ref_state, x)
    (l_jbn, _), g_jbn = _loss_and_grad(model, state, x)
    if options.get("renorm"):
        # renorm at step 0 (running mean 0, var 1): r = clip(σ_B, 1/1.5, 1.5), d = clip(μ_B, ±5).
        assert not np.allclose(l_jbn, l_ref, rtol=1e-3)
        return
    np.testing.assert_allclose(l_jbn, l_ref, rtol=1e-5)
    _assert_trees_close(g_jbn, g_ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- #
# Errors.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mode", ["ema", "legacy"])
def test_ema_modes_raise(mode):
    with pytest.raises(ValueError, match=f"mode='{mode}'.*mode='batch'"):
        je.BatchNorm(C, "batch", mode=mode)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="fast"), ValueError, "mode must be 'batch'"),
        (dict(input_size=0), ValueError, "input_size must be a positive int"),
        (dict(input_size=2.0), TypeError, "input_size must be a positive int"),
        (dict(axis_name=None), ValueError, "axis_name must name the batch axis"),
        (dict(axis_name={"a": 1}), TypeError, "axis_name must be hashable"),
        (dict(eps=0.0), ValueError, "eps must be > 0.0, got 0.0"),
        (dict(momentum=1.5), ValueError, "momentum must be >= 0.0 and <= 1.0, got 1.5"),
        (dict(momentum="0.9"), TypeError, "momentum must be a Python float"),
        (dict(residual="x"), ValueError, "residual must be 'input' or 'output'"),
        (dict(min_scale=0.0), ValueError, "min_scale must be > 0.0"),
        (dict(rmax=0.5), ValueError, "rmax must be >= 1.0"),
        (dict(dmax=-1.0), ValueError, "dmax must be >= 0.0"),
        (dict(renorm=1), TypeError, "renorm must be a Python bool"),
        (dict(inference=None), TypeError, "inference must be a Python bool"),
        (dict(virtual_batch_size=0), ValueError, "virtual_batch_size must be a positive int"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    args = dict(input_size=C, axis_name="batch") | kwargs
    with pytest.raises(error, match=match):
        je.BatchNorm(**args)


def test_call_errors():
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, ("batch", "dev"))
    x = _data((C, 2))
    with pytest.raises(NameError, match=r"axis_name=\('batch', 'dev'\).*'batch'.*jax\.vmap"):
        bn(x[0], state)
    with pytest.raises(NameError, match=r"named batch axis 'dev'.*axis_name='dev'"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    with pytest.raises(ValueError, match=r"takes one example of shape \(3, \*spatial\)"):
        jax.vmap(bn, **VMAP)(x[None], state)
    with pytest.raises(TypeError, match="inference must be a Python bool"):
        bn(x[0], state, inference=jnp.array(True))
    flat, flat_state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch")
    with pytest.raises(TypeError, match="mask must be boolean"):
        jax.vmap(lambda x, s: flat(x, s, mask=1.0), **VMAP)(x[:, :, 0], flat_state)
    with pytest.raises(ValueError, match=r"mask of shape \(2,\) does not broadcast"):
        jax.vmap(lambda x, s: flat(x, s, mask=jnp.ones(2, bool)), **VMAP)(x[:, :, 0], flat_state)
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        jax.vmap(flat, **VMAP)(x[:1, :, 0], flat_state)
    ghost, ghost_state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", virtual_batch_size=3)
    with pytest.raises(ValueError, match="virtual_batch_size=3 does not divide the batch"):
        jax.vmap(ghost, **VMAP)(x, ghost_state)
    ghost, ghost_state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", virtual_batch_size=1)
    with pytest.raises(ValueError, match="virtual_batch_size=1 examples of shape"):
        jax.vmap(ghost, **VMAP)(x[:, :, 0], ghost_state)
    with pytest.raises(TypeError, match="state must be the model's eqx.nn.State"):
        je.convert(flat, {"mean": 0})
    with pytest.raises(ValueError, match=r"options \['axis_name'\] are taken from each"):
        je.convert(flat, flat_state, axis_name="x")


def test_convert_with_another_models_state_names_state():
    def seq(width):
        layers = [
            eqx.nn.Linear(3, width, key=jax.random.key(0)),
            eqx.nn.BatchNorm(width, "b", mode="batch"),
        ]
        return eqx.nn.make_with_state(eqx.nn.Sequential)(layers)

    bn, bn_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "b", mode="batch")
    model, state = seq(3)
    with pytest.raises(ValueError, match=r"state has no entry 'BatchNorm.batch_counter', which "
                       r"model's BatchNorm needs: state must be model's eqx.nn.State"):  # fmt: skip
        je.convert(bn, state)
    with pytest.raises(ValueError, match=r"'Sequential.layers\[1\].batch_counter', which model's "
                       r"Sequential.layers\[1\] needs"):  # fmt: skip
        je.convert(model, bn_state)
    _, wide_state = seq(5)
    with pytest.raises(ValueError, match=r"running statistics of shape \(5,\) for model's "
                       r"Sequential.layers\[1\], which has input_size=3"):  # fmt: skip
        je.convert(model, wide_state)


def test_import_jbn_without_equinox():
    code = (
        "import sys; sys.modules['equinox'] = None; import jbn; "
        "assert 'jbn.equinox' not in sys.modules; "
        "exec('try:\\n import jbn.equinox\\nexcept ImportError: pass\\n"
        'else: raise SystemExit("imported")\')'
    )
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env, cwd=root)
