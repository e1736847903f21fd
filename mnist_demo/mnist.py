"""Finding, downloading, verifying and reading the MNIST IDX files.

The four standard files of the MNIST database (LeCun, Cortes, Burges) are looked
for, gzip-compressed or not: in the directory given explicitly (``--data-dir`` of
``train_mnist.py``) and nowhere else when one is given; otherwise in
``$JBN_DATA_DIR``, then in the copy the repository ships (:data:`SHIPPED_DIR`,
``data/mnist`` beside this package, found from the package and not from the working
directory), then in ``~/.cache/jbn/mnist`` (or ``$XDG_CACHE_HOME/jbn/mnist``).
A clone therefore never needs the network.

Downloading stays available for a directory the user names: if no directory holds
all four files, they are downloaded (with a timeout) from the public mirrors in
:data:`MIRRORS` into the given directory, else into ``$JBN_DATA_DIR``; without either,
nothing is downloaded and the error says how to name one. Every file is checked
against the SHA-256 of its *uncompressed* content (the shipped copy too), so gzip
wrappers from any mirror are accepted. Broken files (truncated, wrong magic number,
wrong checksum, images and labels of different counts) raise :class:`MNISTError`
with a message naming the file and saying what is wrong; a short dataset is never
returned silently.

Only the Python standard library and numpy are used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import struct
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from .files import atomic_write, remove_stale_tmp

__all__ = [
    "FILES",
    "MIRRORS",
    "MNISTError",
    "MNISTNotFoundError",
    "SHIPPED_DIR",
    "Dataset",
    "candidate_dirs",
    "download",
    "download_dir",
    "find_files",
    "load_mnist",
    "read_idx",
    "write_idx",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


class FileSpec(NamedTuple):
    """What one official MNIST file must be.

    Attributes:
      name: The file name without ``.gz``.
      magic: The IDX magic number (2051 images, 2049 labels).
      count: The number of examples in the official file.
      sha256: SHA-256 of the uncompressed official file.
    """

    name: str
    magic: int
    count: int
    sha256: str


#: The four official files, keyed by role. Checksums are those of the
#: uncompressed content.
FILES: dict[str, FileSpec] = {
    "train_images": FileSpec(
        "train-images-idx3-ubyte",
        IMAGES_MAGIC,
        60000,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train_labels": FileSpec(
        "train-labels-idx1-ubyte",
        LABELS_MAGIC,
        60000,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "test_images": FileSpec(
        "t10k-images-idx3-ubyte",
        IMAGES_MAGIC,
        10000,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "test_labels": FileSpec(
        "t10k-labels-idx1-ubyte",
        LABELS_MAGIC,
        10000,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}

#: Public mirrors of the gzip-compressed files, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


#: The copy of the four files the repository ships (``data/mnist``, beside the
#: ``mnist_demo`` package; not part of the ``jbn`` wheel or sdist).
SHIPPED_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent.parent / "data" / "mnist"


class MNISTError(RuntimeError):
    """An MNIST file is missing, broken, or does not match the official one."""


class MNISTNotFoundError(MNISTError):
    """The MNIST files are not on disk and could not be downloaded."""


class Dataset(NamedTuple):
    """MNIST as numpy arrays.

    Attributes:
      train_images: ``uint8[n_train, 28, 28]``.
      train_labels: ``uint8[n_train]``.
      test_images: ``uint8[n_test, 28, 28]``.
      test_labels: ``uint8[n_test]``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[pathlib.Path]:
    """Returns the directories searched for the files, in order of preference.

    Args:
      data_dir: A directory given by the user: when given, the only one.

    Returns:
      ``[data_dir]`` when it is given; otherwise ``$JBN_DATA_DIR`` (if set), the
      repository's copy (:data:`SHIPPED_DIR`) and the cache directory, without
      duplicates.
    """
    if data_dir:
        return [pathlib.Path(data_dir).expanduser()]
    dirs: list[pathlib.Path] = []
    env = os.environ.get("JBN_DATA_DIR")
    if env:
        dirs.append(pathlib.Path(env).expanduser())
    dirs.append(SHIPPED_DIR)
    cache_root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    dirs.append(pathlib.Path(cache_root) / "jbn" / "mnist")
    unique: list[pathlib.Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def download_dir(data_dir: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
    """Returns the directory the user named for a download, if any.

    Args:
      data_dir: A directory given by the user.

    Returns:
      ``data_dir`` when it is given, else ``$JBN_DATA_DIR`` when it is set, else
      None: nothing is downloaded into a directory the user did not name (the
      repository's copy or the cache).
    """
    if data_dir:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("JBN_DATA_DIR")
    return pathlib.Path(env).expanduser() if env else None


def _file_in(directory: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_files(dirs: Iterable[pathlib.Path]) -> dict[str, pathlib.Path] | None:
    """Finds the first directory holding all four files.

    Args:
      dirs: Directories to search, in order.

    Returns:
      A mapping from role (see :data:`FILES`) to path, or None if no directory
      holds all four files (plain or ``.gz``).
    """
    for d in dirs:
        found = {role: _file_in(d, spec.name) for role, spec in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


#: What to do about a broken file, unless the caller says otherwise.
DOWNLOAD_AGAIN = "delete it and download it again"


def _remedy(path: pathlib.Path) -> str:
    """What to do about a broken ``path``: restore the shipped copy, or download again."""
    if path.parent == SHIPPED_DIR:
        return (
            "it is the copy the repository ships: restore it with "
            "`git checkout -- data/mnist` (a plain clone holds the files)"
        )
    return DOWNLOAD_AGAIN


def _read_bytes(path: pathlib.Path, remedy: str = DOWNLOAD_AGAIN) -> bytes:
    """Reads a file, decompressing it if it is gzip (detected by its magic)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise MNISTError(
                f"{path}: the gzip stream is truncated or corrupt ({e}); {remedy}"
            ) from e
    return path.read_bytes()


def read_idx(
    path: str | os.PathLike[str],
    expected_magic: int | None = None,
    sha256: str | None = None,
    *,
    remedy: str = DOWNLOAD_AGAIN,
) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (images or labels).

    Args:
      path: The file, gzip-compressed or not.
      expected_magic: If given, the magic number the file must have
        (2051 for images, 2049 for labels).
      sha256: If given, the SHA-256 the uncompressed content must have.
      remedy: What the error of a corrupt or truncated file tells the user to do.

    Returns:
      ``uint8[n, rows, cols]`` for images, ``uint8[n]`` for labels.

    Raises:
      MNISTError: If the file is truncated, has trailing bytes, a wrong magic
        number, an unsupported data type, or a wrong checksum.
    """
    path = pathlib.Path(path)
    data = _read_bytes(path, remedy)
    if len(data) < 4:
        raise MNISTError(f"{path}: truncated: {len(data)} bytes, not even an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">i", data[:4])[0]
    if zero != 0 or (expected_magic is not None and magic != expected_magic):
        want = f" (expected {expected_magic})" if expected_magic is not None else ""
        raise MNISTError(
            f"{path}: wrong magic number {magic:#010x} = {magic}{want}; "
            "this is not an MNIST IDX file of the right kind"
        )
    if dtype_code != 0x08:
        raise MNISTError(f"{path}: IDX data type {dtype_code:#04x} is not unsigned byte (0x08)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise MNISTError(f"{path}: truncated: {len(data)} bytes, shorter than its IDX header")
    shape = struct.unpack(f">{ndim}i", data[4:header_len])
    expected_len = header_len + int(np.prod(shape, dtype=np.int64))
    if len(data) < expected_len:
        raise MNISTError(
            f"{path}: truncated: {len(data)} bytes, but its header announces shape {shape} "
            f"({expected_len} bytes); {remedy}"
        )
    if len(data) > expected_len:
        raise MNISTError(
            f"{path}: {len(data) - expected_len} unexpected trailing bytes after the "
            f"{shape} array its header announces"
        )
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise MNISTError(
                f"{path}: wrong SHA-256 of the uncompressed content: {digest}, expected "
                f"{sha256}; the file is corrupt or not the official one; {remedy}"
            )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None
) -> None:
    """Writes a ``uint8`` array as an IDX file (used to make small test files).

    Args:
      path: Destination. Gzip-compressed if ``compress`` is True, or if it is None
        and the name ends with ``.gz``.
      array: ``uint8`` array with 1 (labels) or 3 (images) dimensions.
      compress: Whether to gzip the file.
    """
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.tobytes()
    path = pathlib.Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)


def _atomic_download(url: str, dest: pathlib.Path, spec: FileSpec, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        # Verified before it is put in place, so a bad download never looks valid.
        atomic_write(dest, resp, verify=lambda tmp: read_idx(tmp, spec.magic, spec.sha256))


def download(
    directory: str | os.PathLike[str],
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
    log=print,
) -> dict[str, pathlib.Path]:
    """Downloads the missing files into ``directory``, verifying each.

    Args:
      directory: Where to put the files (created if needed).
      mirrors: Base URLs tried in order for each file.
      timeout: Seconds for each connection attempt and read.
      log: Called with progress messages.

    Returns:
      A mapping from role to path.

    Raises:
      MNISTNotFoundError: If a file could not be had from any mirror.
    """
    directory = pathlib.Path(directory).expanduser()
    remove_stale_tmp(directory, [spec.name + ".gz" for spec in FILES.values()])
    paths: dict[str, pathlib.Path] = {}
    for role, spec in FILES.items():
        existing = _file_in(directory, spec.name)
        if existing is not None:
            paths[role] = existing
            continue
        dest = directory / (spec.name + ".gz")
        errors = []
        for base in mirrors:
            url = base + spec.name + ".gz"
            log(f"downloading {url}")
            try:
                _atomic_download(url, dest, spec, timeout)
                paths[role] = dest
                break
            except (urllib.error.URLError, OSError, MNISTError, ValueError) as e:
                errors.append(f"  {url}: {e}")
        else:
            raise MNISTNotFoundError(f"could not download {spec.name}.gz:\n" + "\n".join(errors))
    return paths


def _missing_in(directory: pathlib.Path) -> str:
    """What ``directory`` lacks of the four files, in words."""
    if not directory.is_dir():
        return "no such directory"
    missing = [s.name + "(.gz)" for s in FILES.values() if _file_in(directory, s.name) is None]
    return "missing " + ", ".join(missing)


def _missing_message(dirs: Sequence[pathlib.Path], reason: str) -> str:
    names = "\n".join(f"  {s.name}.gz  (or uncompressed {s.name})" for s in FILES.values())
    where = "\n".join(f"  {d}: {_missing_in(d)}" for d in dirs)
    shipped = (
        f"The repository ships them in {SHIPPED_DIR}: restore them with "
        "`git checkout -- data/mnist`. "
        if SHIPPED_DIR in dirs
        else ""
    )
    return (
        f"MNIST data not found ({reason}).\n"
        f"Put the four standard MNIST files\n{names}\n"
        f"into one of these directories (searched in this order):\n{where}\n"
        f"{shipped}To download them, name a directory: `--data-dir DIR` or "
        "`export JBN_DATA_DIR=DIR`. They are on the public MNIST mirrors, e.g.\n  "
        + "\n  ".join(MIRRORS)
    )


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download_missing: bool = True,
    verify: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
    log=print,
) -> Dataset:
    """Finds (downloading if needed), verifies and reads MNIST.

    Args:
      data_dir: The directory to use; when None, the search order of
        :func:`candidate_dirs`.
      download_missing: Whether to download the files when no directory has them,
        into the directory the user named (:func:`download_dir`); without one,
        nothing is downloaded.
      verify: Whether to check the SHA-256 of each file. Turning it off is only
        meant for small synthetic test files: it warns, and files of the official
        size are verified regardless.
      mirrors: Base URLs to download from.
      timeout: Seconds for each download connection and read.
      log: Called with progress messages.

    Returns:
      The dataset (``log`` is told which directory it came from).

    Raises:
      MNISTNotFoundError: If the files are neither on disk nor downloadable.
      MNISTError: If a file is broken, or images and labels differ in count.
    """
    dirs = candidate_dirs(data_dir)
    paths = find_files(dirs)
    if paths is None:
        if not download_missing:
            raise MNISTNotFoundError(_missing_message(dirs, "downloading disabled"))
        target = download_dir(data_dir)
        if target is None:
            raise MNISTNotFoundError(_missing_message(dirs, "no directory named to download into"))
        try:
            paths = download(target, mirrors=mirrors, timeout=timeout, log=log)
        except MNISTNotFoundError as e:
            raise MNISTNotFoundError(
                _missing_message(dirs, "not on disk and the download failed")
                + f"\nDownload errors:\n{e}"
            ) from e

    if not verify:
        warnings.warn(
            "MNIST checksum verification is OFF (verify=False); this is only meant for "
            "small synthetic test files, official-size files are still verified.",
            stacklevel=2,
        )
    arrays = {}
    for role, spec in FILES.items():
        remedy = _remedy(paths[role])
        checksum = spec.sha256 if verify else None
        arrays[role] = read_idx(paths[role], spec.magic, checksum, remedy=remedy)
        if not verify and arrays[role].shape[0] == spec.count:
            # Never skip the check on what claims to be the real thing.
            read_idx(paths[role], spec.magic, spec.sha256, remedy=remedy)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3:
            raise MNISTError(
                f"{paths[f'{split}_images']}: images must be 3-D, got shape {images.shape}"
            )
        if labels.ndim != 1:
            raise MNISTError(
                f"{paths[f'{split}_labels']}: labels must be 1-D, got shape {labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise MNISTError(
                f"{split} images and labels differ in count: {images.shape[0]} images in "
                f"{paths[f'{split}_images']} but {labels.shape[0]} labels in "
                f"{paths[f'{split}_labels']}"
            )
        if labels.size and labels.max() > 9:
            raise MNISTError(f"{paths[f'{split}_labels']}: label {labels.max()} is not a digit")
    log(f"MNIST from {paths['train_images'].parent}")
    return Dataset(**arrays)
