"""The demo's networks: a small CNN, an MLP and the paper's sigmoid network.

Each takes a batch-norm constructor (:func:`norm_factory`), so the same network
is built with :class:`jbn.BatchNorm`, with :class:`flax.linen.BatchNorm` or
without batch norm. The benchmarks (``benchmarks/model.py``) import them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

import jbn

from .config import Config

NormFactory = Callable[..., nn.Module]

#: The mesh axis the data-parallel step shards the batch over.
AXIS = "data"


def norm_factory(
    kind: str, *, momentum: float = 0.9, epsilon: float = 1e-5, axis_name: str | None = None
) -> NormFactory | None:
    """Returns a constructor of batch-norm layers, or None for no normalization.

    Args:
      kind: ``'jbn'`` for :class:`jbn.BatchNorm`, ``'flax'`` for
        :class:`flax.linen.BatchNorm`, ``'none'`` for None.
      momentum: Momentum of the running averages.
      epsilon: Added to the variance.
      axis_name: Mapped axis over which the batch statistics are averaged
        (``'data'`` under the data-parallel step).

    Returns:
      A callable taking ``use_running_average`` (and any other option of the
      class) and returning a layer.
    """
    if kind == "none":
        return None
    if kind == "jbn":
        cls = jbn.BatchNorm
    elif kind == "flax":
        cls = nn.BatchNorm
    else:
        raise ValueError(f"unknown norm {kind!r}; expected 'jbn', 'flax' or 'none'")
    return functools.partial(cls, momentum=momentum, epsilon=epsilon, axis_name=axis_name)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (NHWC), as a reshape and a max.

    Equal to ``nn.max_pool(x, (2, 2), (2, 2))`` for even sizes; its gradient is
    much faster on CPU than XLA's select-and-scatter.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
    """Conv(32)-BN-ReLU-pool, Conv(64)-BN-ReLU-pool, Dense(128)-BN-ReLU, Dense(10).

    Attributes:
      norm: Batch-norm constructor (see :func:`norm_factory`), or None.
      features: Channels of the 3x3 convolutions.
      hidden: Width of the hidden dense layer.
    """

    norm: NormFactory | None = None
    features: Sequence[int] = (32, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_bias = self.norm is None
        for f in self.features:
            x = nn.Conv(f, (3, 3), use_bias=use_bias)(x)
            if self.norm is not None:
                x = self.norm(use_running_average=not train)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, use_bias=use_bias)(x)
        if self.norm is not None:
            x = self.norm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x)


class MLP(nn.Module):
    """Fully connected ReLU network with batch norm before each ReLU.

    Attributes:
      norm: Batch-norm constructor, or None.
      hidden: Widths of the hidden layers.
    """

    norm: NormFactory | None = None
    hidden: Sequence[int] = (512, 256)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.Dense(h, use_bias=self.norm is None)(x)
            if self.norm is not None:
                x = self.norm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x)


class Fig1MLP(nn.Module):
    """The network of the paper's section 4.1: 3 x 100 sigmoid units, softmax.

    Weights start from a small Gaussian (``init_std``); with ``norm`` set, batch
    norm sits between each affine map and its sigmoid.

    Attributes:
      norm: Batch-norm constructor, or None for the baseline.
      hidden: Widths of the hidden layers.
      init_std: Standard deviation of the initial weights.
    """

    norm: NormFactory | None = None
    hidden: Sequence[int] = (100, 100, 100)
    init_std: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Returns the logits and the sigmoid inputs of the last hidden layer."""
        init = nn.initializers.normal(self.init_std)
        x = x.reshape((x.shape[0], -1))
        pre = x
        for h in self.hidden:
            x = nn.Dense(h, kernel_init=init, use_bias=self.norm is None)(x)
            if self.norm is not None:
                x = self.norm(use_running_average=not train)(x)
            pre = x
            x = nn.sigmoid(x)
        return nn.Dense(10, kernel_init=init)(x), pre


def create_model(config: Config, axis_name: str | None = AXIS) -> nn.Module:
    """Builds the model named by ``config.model`` with ``config.norm``."""
    norm = norm_factory(
        config.norm, momentum=config.bn_momentum, epsilon=config.bn_epsilon, axis_name=axis_name
    )
    if config.model == "cnn":
        return CNN(norm=norm)
    if config.model == "mlp":
        return MLP(norm=norm)
    raise ValueError(f"unknown model {config.model!r}; expected 'cnn' or 'mlp'")
