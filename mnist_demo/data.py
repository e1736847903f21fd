"""MNIST as training data: preprocessing, the data order, augmentation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from . import mnist
from .config import Config

# Mean and standard deviation of the MNIST training pixels (in [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


@dataclasses.dataclass
class Split:
    """One split of MNIST, preprocessed.

    Attributes:
      images: ``float32[n, 28, 28, 1]``, standardized.
      labels: ``int32[n]``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def preprocess(images: np.ndarray) -> np.ndarray:
    """Maps ``uint8[n, 28, 28]`` images to standardized ``float32[n, 28, 28, 1]``."""
    x = images.astype(np.float32) / 255.0
    return ((x - PIXEL_MEAN) / PIXEL_STD)[..., None]


def get_datasets(config: Config, log: Callable[[str], None] = print) -> tuple[Split, Split]:
    """Loads MNIST (finding or downloading it, see :mod:`mnist_demo.mnist`).

    Args:
      config: Uses ``data_dir``, ``download``, ``verify`` and ``train_limit``.
      log: Called with the directory used and messages about downloading.

    Returns:
      The training and test splits.
    """
    ds = mnist.load_mnist(
        config.data_dir, download_missing=config.download, verify=config.verify, log=log
    )
    n = config.train_limit or len(ds.train_labels)
    train = Split(preprocess(ds.train_images[:n]), ds.train_labels[:n].astype(np.int32))
    test = Split(preprocess(ds.test_images), ds.test_labels.astype(np.int32))
    return train, test


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training examples in one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(order: np.ndarray, batch_size: int, start: int) -> Iterator[np.ndarray]:
    """The index batches of one epoch from batch ``start`` on; the last incomplete one is dropped."""
    for i in range(start, len(order) // batch_size):
        yield order[i * batch_size : (i + 1) * batch_size]


def step_indices(seed: int, n: int, batch_size: int, start: int, count: int) -> np.ndarray:
    """Example indices of steps ``start..start+count``: epochs of shuffled data, in order."""
    per_epoch = n // batch_size
    rows = []
    epoch, perm = -1, None
    for step in range(start, start + count):
        e, i = divmod(step, per_epoch)
        if e != epoch:
            epoch, perm = e, epoch_permutation(seed, e, n)
        rows.append(perm[i * batch_size : (i + 1) * batch_size])
    return np.stack(rows)


def random_shift(
    images: np.ndarray,
    max_shift: int,
    rng: np.random.Generator,
    *,
    rows: slice | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Shifts each image by a random offset in ``[-max_shift, max_shift]`` pixels per axis.

    Args:
      images: ``[n, h, w, c]``: a batch, or its rows ``rows`` in a run across processes.
      max_shift: Largest shift; 0 returns ``images`` unchanged.
      rng: Source of the offsets.
      rows: Which rows of the batch ``images`` are (default: all of it). The offsets
        are drawn for the whole batch, so each process's rows get the shifts they
        get in one process.
      batch_size: The size of the whole batch when ``rows`` is given.

    Returns:
      The shifted images; pixels shifted in are the background value (the minimum).
    """
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    m = max_shift
    padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=images.min())
    dy, dx = rng.integers(0, 2 * m + 1, size=(2, n if rows is None else batch_size))
    if rows is not None:
        dy, dx = dy[rows], dx[rows]
    rows_ = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows_[:, :, None], cols[:, None, :]]
