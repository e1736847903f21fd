"""Model-level benchmark: a whole train step with jbn's batch norm against flax's.

Two models, each built with ``jbn.BatchNorm`` (``residual="input"``, the
default, and ``residual="output"``) and with ``flax.linen.BatchNorm`` (same
momentum, epsilon and initialization):

- ``resnet``: a small CIFAR-style ResNet (3 stages of 2 basic blocks, 15
  batch-norm layers) on 32x32x3 images.
- ``cnn``: the demo's CNN (``mnist_demo.models.CNN``, imported):
  Conv(32)-BN-ReLU-pool, Conv(64)-BN-ReLU-pool, Dense(128)-BN-ReLU, Dense(10),
  on 28x28x1 images.

A step is the loss (softmax cross-entropy), its gradient, the SGD-with-momentum
update (optax) and the running-statistics update, in one jit. Reported: step
time and images per second, and the compiled step's temporary memory
(``memory_analysis().temp_size_in_bytes``; XLA's peak adds arguments and outputs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_demo.models import CNN
from mnist_demo.models import norm_factory as demo_norm_factory

from ._timing import TimingConfig, time_interleaved
from .layer import _memory

MODEL_IMPLS = ("jbn", "jbn_out", "flax")  # jbn_out: jbn with residual="output"
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class LocalJbnBatchNorm(nn.Module):
    """A minimal linen layer around ``core.bn_forward``, for ``--compare-core`` (copies of the core)."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    residual: str = "input"
    core: Any = None  # a module with bn_forward (default: jbn); --compare-core passes copies

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        import jbn

        core = jbn if self.core is None else self.core
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        c = x.shape[-1]
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        params = {
            "scale": self.param("scale", nn.initializers.ones, (c,)),
            "bias": self.param("bias", nn.initializers.zeros, (c,)),
        }
        train = not use_running_average and not self.is_initializing()
        y, state = core.bn_forward(
            params,
            {"mean": mean.value, "var": var.value},
            x,
            train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            residual=self.residual,
        )
        if train:
            mean.value, var.value = state["mean"], state["var"]
        return y


def norm_factory(
    kind: str, extra_cores: dict[str, Any] | None = None
) -> tuple[Callable[..., nn.Module], str]:
    """The batch-norm constructor of an implementation, and a label saying which it is."""
    if extra_cores and kind in extra_cores:
        return (
            functools.partial(
                LocalJbnBatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, core=extra_cores[kind]
            ),
            f"{kind} (local linen wrapper)",
        )
    if kind == "flax":
        return demo_norm_factory("flax", momentum=BN_MOMENTUM, epsilon=BN_EPSILON), (
            "flax.linen.BatchNorm"
        )
    if kind == "jbn":
        return demo_norm_factory("jbn", momentum=BN_MOMENTUM, epsilon=BN_EPSILON), "jbn.BatchNorm"
    if kind == "jbn_out":
        jbn_norm = demo_norm_factory("jbn", momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
        return functools.partial(jbn_norm, residual="output"), 'jbn.BatchNorm residual="output"'
    raise ValueError(f"unknown norm {kind!r}")


class BasicBlock(nn.Module):
    features: int
    strides: int
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(self.norm, use_running_average=not train)
        s = (self.strides, self.strides)
        y = nn.relu(norm()(nn.Conv(self.features, (3, 3), s, use_bias=False)(x)))
        y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if x.shape != y.shape:
            x = norm()(nn.Conv(self.features, (1, 1), s, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv, stages of basic blocks, global average pool, dense."""

    norm: Callable[..., nn.Module]
    widths: Sequence[int] = (16, 32, 64)
    blocks: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(
            self.norm(use_running_average=not train)(
                nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
            )
        )
        for i, w in enumerate(self.widths):
            for j in range(self.blocks):
                x = BasicBlock(w, 2 if i > 0 and j == 0 else 1, self.norm)(x, train)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    make: Callable[[Callable[..., nn.Module]], nn.Module]
    batch: int
    image: tuple[int, int, int]


FULL_MODELS = (
    ModelSpec("resnet", lambda norm: ResNet(norm), 32, (32, 32, 3)),
    ModelSpec("cnn", lambda norm: CNN(norm), 128, (28, 28, 1)),
)
TINY_MODELS = (
    ModelSpec("resnet", lambda norm: ResNet(norm, widths=(4, 8, 8)), 4, (8, 8, 3)),
    ModelSpec("cnn", lambda norm: CNN(norm, features=(4, 8), hidden=8), 8, (8, 8, 1)),
)


def init_variables(model: nn.Module, images: jax.Array, seed: int = 0):
    """He-normal kernels, unit scales, zero biases and statistics, without jax.random.

    ``model.init`` would compile every initializer (threefry, truncated normal),
    which takes longer on a small CPU than the whole benchmark of a tiny model;
    the step time does not depend on how the weights were drawn.
    """
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return variables["params"], variables["batch_stats"]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return jax.jit(train_step)


def run_model(
    spec: ModelSpec,
    timing: TimingConfig,
    extra_cores: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(0.0, 1.0, (spec.batch, *spec.image)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, spec.batch), jnp.int32)
    tx = optax.sgd(0.05, momentum=0.9)
    fns, info = {}, {}
    for kind in (*MODEL_IMPLS, *(extra_cores or {})):
        norm, label = norm_factory(kind, extra_cores)
        model = spec.make(norm)
        params, batch_stats = init_variables(model, images)
        opt_state = tx.init(params)
        step = make_train_step(model, tx)
        args = (params, batch_stats, opt_state, images, labels)
        compiled = step.lower(*args).compile()
        out = compiled(*args)
        info[kind] = {
            "norm": label,
            "bn_layers": sum(
                1
                for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)
                if getattr(path[-1], "key", None) == "mean"
            ),
            "params": sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)),
            "memory": _memory(compiled),
            "loss": float(out[3]),
        }
        fns[kind] = functools.partial(compiled, *args)
    times = time_interleaved(fns, timing)
    records = []
    for kind in fns:
        t = times[kind]["median_s"]
        rec = {
            "model": spec.name,
            "batch": spec.batch,
            "image": list(spec.image),
            "impl": kind,
            **info[kind],
            "step": times[kind],
            "images_per_s": spec.batch / t,
        }
        records.append(rec)
    flax = next(r for r in records if r["impl"] == "flax")
    for rec in records:
        rec["throughput_x_flax"] = rec["images_per_s"] / flax["images_per_s"]
        if rec["memory"] and flax["memory"]:
            rec["temp_x_flax"] = rec["memory"]["temp_bytes"] / max(flax["memory"]["temp_bytes"], 1)
    jb = next(r for r in records if r["impl"] == "jbn")
    log(
        f"  {spec.name:8s} batch {spec.batch:4d}: jbn {jb['step']['median_s'] * 1e3:8.2f} ms/step, "
        f"{jb['throughput_x_flax']:.3f}x flax throughput, temp {jb.get('temp_x_flax', float('nan')):.3f}x flax"
    )
    return records


def run(
    models: Sequence[ModelSpec],
    timing: TimingConfig,
    extra_cores: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
):
    return [rec for spec in models for rec in run_model(spec, timing, extra_cores, log)]
