"""jbn.linen.intercept(): flax's BatchNorm run through jbn, against flax's own exact-variance module."""

import functools
from typing import Any

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbn.linen import intercept

# Every leaf moved (kernels too), as these tests were written for.
perturbed = functools.partial(helpers.perturb_variables, std=0.3, every_leaf=True)

RTOL = 1e-5


class Block(nn.Module):
    """A ResNet basic block as flax's examples write it (conv, norm, relu; projection shortcut)."""

    features: int
    strides: int
    norm: Any

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(self.norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(
                residual
            )
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """10 batch norms: a stem, stages of residual blocks with stride-2 convolutions, a head."""

    use_fast_variance: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            use_fast_variance=self.use_fast_variance,
            axis_name=self.axis_name,
        )
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(norm(name="bn_init")(x))
        for i, (features, strides) in enumerate([(4, 1), (8, 2), (16, 2)]):
            x = Block(features, strides, norm, name=f"block{i}")(x)
        x = norm(name="bn_head")(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(3)(x)


X = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
LABELS = jax.random.randint(jax.random.key(1), (8,), 0, 3)
JBN = ResNet()  # use_fast_variance=True, which jbn's exact statistics replace
FLAX = ResNet(use_fast_variance=False)


# Compiled: op by op, the ResNet's initializers compile one by one.
FLAX_INIT = jax.jit(FLAX.init, static_argnames="train")
VARIABLES = perturbed(FLAX_INIT(jax.random.key(2), X[:2], train=False))


def loss_and_stats(model, variables, x, labels, train, axis_name=None):
    """Cross-entropy, its parameter gradient, the logits and the new batch_stats."""

    def loss(params):
        out = model.apply(
            {**variables, "params": params},
            x,
            train=train,
            mutable=["batch_stats"] if train else False,
        )
        logits, updates = out if train else (out, {})
        one_hot = jax.nn.one_hot(labels, 3)
        value = -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1))
        return value, (logits, updates.get("batch_stats"))

    grads, (logits, stats) = jax.grad(loss, has_aux=True)(variables["params"])
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    return logits, stats, grads


assert_trees_close = functools.partial(helpers.assert_trees_close, rtol=RTOL, atol=1e-6)


def test_resnet_has_at_least_ten_batch_norms():
    paths = jax.tree_util.tree_leaves_with_path(VARIABLES["batch_stats"])
    assert sum(1 for p, _ in paths if p[-1].key == "mean") == 10


def test_init_gives_flax_variables_exactly():
    expected = FLAX_INIT(jax.random.key(3), X[:2], train=True)
    # Compiled: under intercept() every op has a new jit cache key, so op by op each one compiles.
    with intercept():
        got = jax.jit(JBN.init, static_argnames="train")(jax.random.key(3), X[:2], train=True)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("train", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_resnet_jit_matches_flax(train):
    ref = jax.jit(functools.partial(loss_and_stats, FLAX, train=train))(VARIABLES, X, LABELS)
    got = jax.jit(intercept()(functools.partial(loss_and_stats, JBN, train=train)))(
        VARIABLES, X, LABELS
    )
    assert_trees_close(got, ref)


def test_resnet_pmap_with_axis_name_matches_flax(four_devices):
    x = X.reshape((4, 2) + X.shape[1:])
    labels = LABELS.reshape(4, 2)

    def run(model, wrap=lambda f: f):
        step = wrap(functools.partial(loss_and_stats, model, train=True, axis_name="batch"))
        return jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0), devices=four_devices)(
            VARIABLES, x, labels
        )

    ref = run(FLAX.clone(axis_name="batch"))
    got = run(JBN.clone(axis_name="batch"), intercept())
    assert_trees_close(got, ref)
    # synchronized: every device stores the statistics of the global batch
    for leaf in jax.tree.leaves(got[1]):
        np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[:1], leaf.shape))


def test_shard_map_with_axis_name_matches_one_device(four_devices):
    mesh = jax.sharding.Mesh(np.array(four_devices), ("batch",))
    P = jax.sharding.PartitionSpec
    x = 3.0 + jax.random.normal(jax.random.key(11), (8, 4))
    bn = nn.BatchNorm(use_running_average=False, axis_name="batch")
    variables = perturbed(bn.init(jax.random.key(0), x))

    def step(bn, variables, x, axis_name=None):
        def loss(params):
            y, updates = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), (y, updates)

        grads, (y, updates) = jax.grad(loss, has_aux=True)(variables["params"])
        if axis_name is not None:  # the loss is a sum over the devices' examples
            grads = jax.lax.psum(grads, axis_name)
        return grads, y, updates

    f = jax.shard_map(
        intercept()(functools.partial(step, bn, axis_name="batch")),
        mesh=mesh,
        in_specs=(P(), P("batch")),
        out_specs=(P(), P("batch"), P()),
        check_vma=False,
    )
    got = jax.jit(f)(variables, x)
    ref = step(nn.BatchNorm(use_running_average=False, use_fast_variance=False), variables, x)
    assert_trees_close(got, ref, rtol=1e-4, atol=1e-5)


def test_vjp_residuals_show_jbns_saving():
    def f(model):
        def apply(params, x):
            y, _ = model.apply(
                {**VARIABLES, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return y

        return apply

    def residual_bytes(fn):
        _, vjp_fn = jax.vjp(fn, VARIABLES["params"], X)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn))

    flax_bytes = residual_bytes(f(FLAX))
    with intercept():
        jbn_bytes = residual_bytes(f(JBN))
    # measured: 165 456 vs 208 176 bytes (0.79x) for this model and batch
    assert jbn_bytes < 0.85 * flax_bytes, (jbn_bytes, flax_bytes)


# ---- every flax option, one layer at a time --------------------------------

OPTIONS = [
    dict(),
    dict(use_bias=False),
    dict(use_scale=False),
    dict(use_bias=False, use_scale=False),
    dict(momentum=0.5, epsilon=1e-2),
    dict(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0)),
    dict(axis=1),
    dict(axis=(1, 3)),
    dict(dtype=jnp.bfloat16),
    dict(param_dtype=jnp.bfloat16),
    dict(param_dtype=jnp.bfloat16, force_float32_reductions=False),
]


def _ids(options):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in options.items()) or "defaults"


CASES = [(options, False) for options in OPTIONS] + [
    (options, True) for options in OPTIONS if set(options) <= {"axis", "dtype"}
]


@pytest.mark.parametrize(
    "options, masked", CASES, ids=[_ids(o) + ("-masked" if m else "") for o, m in CASES]
)
def test_every_option_matches_flax(options, masked, mode="field"):
    x = 1.0 + jax.random.normal(jax.random.key(4), (6, 3, 2, 4))
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (6, 3, 2, 1)) if masked else None
    low = jnp.bfloat16 in options.values()
    field = dict(use_running_average=False) if mode == "field" else {}
    call = dict(use_running_average=False) if mode == "call" else {}
    ref_bn = nn.BatchNorm(use_fast_variance=False, **field, **options)
    bn = nn.BatchNorm(**field, **options)

    ref_vars = ref_bn.init(jax.random.key(6), x, mask=mask, **call)
    with intercept():
        got_vars = bn.init(jax.random.key(6), x, mask=mask, **call)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), got_vars) == jax.tree.map(
        lambda a: (a.shape, a.dtype), ref_vars
    )
    assert_trees_close(got_vars, ref_vars, rtol=0, atol=0)

    variables = perturbed(ref_vars, seed=1)
    ref = ref_bn.apply(variables, x, mask=mask, mutable=["batch_stats"], **call)
    with intercept():
        got = bn.apply(variables, x, mask=mask, mutable=["batch_stats"], **call)
    tol = dict(rtol=2e-2, atol=2e-2) if low else {}
    if options.get("force_float32_reductions") is False:
        # flax's update promotes its param_dtype running statistics to float32; jbn
        # keeps the variables' dtype
        assert {a.dtype for a in jax.tree.leaves(got[1])} == {jnp.dtype(jnp.bfloat16)}
        ref = jax.tree.map(lambda a, b: a.astype(b.dtype), ref, got)
    assert_trees_close(got, ref, **tol)

    # evaluation mode: running statistics, no update
    eval_kwargs = dict(use_running_average=True)
    ref_eval = ref_bn.clone(use_running_average=None).apply(variables, x, **eval_kwargs)
    with intercept():
        got_eval = bn.clone(use_running_average=None).apply(variables, x, **eval_kwargs)
    assert_trees_close(got_eval, ref_eval, **tol)


@pytest.mark.parametrize("masked", [False, True])
def test_use_running_average_as_call_argument(masked):
    test_every_option_matches_flax({}, masked, mode="call")


def test_axis_index_groups_under_pmap(four_devices):
    x = jax.random.normal(jax.random.key(7), (4, 3, 5))
    bn = nn.BatchNorm(use_running_average=False, axis_name="i", axis_index_groups=[[0, 1], [2, 3]])
    variables = bn.init(jax.random.key(0), x[0])

    def f(x):
        return bn.apply(variables, x, mutable=["batch_stats"])

    ref = jax.pmap(f, axis_name="i", devices=four_devices)(x)
    got = jax.pmap(intercept()(f), axis_name="i", devices=four_devices)(x)
    assert_trees_close(got, ref)
    # the groups really are separate
    assert not np.allclose(got[1]["batch_stats"]["mean"][0], got[1]["batch_stats"]["mean"][2])


def test_jbn_options_reach_every_layer():
    x = jax.random.normal(jax.random.key(8), (5, 3))
    bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    variables = bn.init(jax.random.key(0), x)
    with intercept(unbiased_running_var=True):
        _, updates = bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], np.var(x, 0, ddof=1), rtol=1e-5)


def test_unknown_option_is_rejected_before_anything_runs():
    with pytest.raises(TypeError, match=r"unknown options \['momentum'\].*residual"):
        with intercept(momentum=0.5):
            pass


# ---- leaving the context restores flax exactly ------------------------------


def _flax_outputs():
    x = 1e3 + jax.random.normal(jax.random.key(9), (8, 4))
    bn = nn.BatchNorm(use_running_average=False)  # fast variance: differs from jbn at this offset
    variables = bn.init(jax.random.key(0), x)
    return bn.apply(variables, x, mutable=["batch_stats"])


def test_leaving_restores_flax_bit_for_bit():
    before = _flax_outputs()
    with intercept():
        inside = _flax_outputs()
    after = _flax_outputs()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(inside), strict=True)
    )


def test_exception_and_nesting_restore_flax():
    before = _flax_outputs()
    with pytest.raises(RuntimeError, match="boom"):
        with intercept():
            with intercept(residual="output"):
                raise RuntimeError("boom")
    with intercept():
        with intercept():
            _flax_outputs()
        inner_done = _flax_outputs()  # still intercepted
    after = _flax_outputs()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before[0], inner_done[0])


def test_innermost_options_apply():
    x = jax.random.normal(jax.random.key(8), (5, 3))
    bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    variables = bn.init(jax.random.key(0), x)
    with intercept(unbiased_running_var=True):
        with intercept():
            _, updates = bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], np.var(x, 0), rtol=1e-5)


# ---- subclasses: work, or a clear error --------------------------------------


class FieldsOnly(nn.BatchNorm):
    momentum: float = 0.5


class CallsSuper(nn.BatchNorm):
    def __call__(self, x, use_running_average=None, *, mask=None):
        return super().__call__(2.0 * x, use_running_average, mask=mask) + 1.0


class OwnCall(nn.BatchNorm):
    def __call__(self, x, use_running_average=None, *, mask=None):
        return x


class OverridesParam(nn.BatchNorm):
    def param(self, name, *args, **kwargs):
        return super().param(name, *args, **kwargs)


def _offset_batch():
    return 1e3 + jax.random.normal(jax.random.key(10), (8, 4))


@pytest.mark.parametrize(
    "cls", [FieldsOnly, CallsSuper, nn.remat(nn.BatchNorm)], ids=["fields", "super", "remat"]
)
def test_subclasses_that_keep_flax_call_work(cls):
    x = _offset_batch()
    ref_bn = cls(use_running_average=False, use_fast_variance=False)
    bn = cls(use_running_average=False)
    variables = ref_bn.init(jax.random.key(0), x)
    ref = ref_bn.apply(variables, x, mutable=["batch_stats"])
    with intercept():
        got = bn.apply(variables, x, mutable=["batch_stats"])
    assert_trees_close(got, ref, rtol=1e-4, atol=1e-4)
    # and they did run through jbn: flax's fast variance is off at this offset
    fast = bn.apply(variables, x, mutable=["batch_stats"])
    assert not np.allclose(fast[1]["batch_stats"]["var"], got[1]["batch_stats"]["var"], rtol=1e-3)


@pytest.mark.parametrize(
    "cls, match",
    [
        (OwnCall, "never calls flax.linen.BatchNorm.__call__"),
        (OverridesParam, "OverridesParam.param"),
    ],
)
def test_subclasses_that_would_lose_behaviour_raise(cls, match):
    x = _offset_batch()
    bn = cls(use_running_average=False)
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    with intercept(), pytest.raises(TypeError, match=match):
        bn.apply(variables, x, mutable=["batch_stats"])
