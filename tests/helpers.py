"""Helpers shared by the tests.

The MNIST demo (``tests/test_demo_*.py``): tiny synthetic IDX data sets and configurations.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from mnist_demo import config as demo_config
from mnist_demo import mnist

REPO = pathlib.Path(__file__).resolve().parent.parent
#: The project's copy of MNIST beside the repository (tests and CI only; the demo
#: itself never looks there).
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
N_TRAIN, N_TEST = 512, 128


def real_mnist_dir() -> pathlib.Path | None:
    """The directory of the real MNIST files for the tests: ``$JBN_DATA_DIR``, else ``../shared``."""
    for d in (os.environ.get("JBN_DATA_DIR"), SHARED_MNIST):
        if d and mnist.find_files([pathlib.Path(d)]) is not None:
            return pathlib.Path(d)
    return None


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
