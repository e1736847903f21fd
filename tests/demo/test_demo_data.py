"""Tests of the demo's MNIST loader (mnist_demo.mnist) and file writing (mnist_demo.files)."""

from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REAL_MNIST, REPO, synthetic_digits, write_dataset

from mnist_demo import files, mnist
from mnist_demo.mnist import MNISTError, MNISTNotFoundError


def load_unverified(directory: pathlib.Path | None, **kwargs) -> mnist.Dataset:
    with pytest.warns(UserWarning, match="verification is OFF"):
        return mnist.load_mnist(directory, download_missing=False, verify=False, **kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    images, labels = synthetic_digits(20, 0)
    write_dataset(tmp_path, 20, 10, gz=gz)
    ds = load_unverified(tmp_path)
    np.testing.assert_array_equal(ds.train_images, images)
    np.testing.assert_array_equal(ds.train_labels, labels)
    assert ds.test_images.shape == (10, 28, 28) and ds.test_labels.shape == (10,)


def test_checksum_checked_by_default(tiny_dir):
    with pytest.raises(MNISTError, match="wrong SHA-256"):
        mnist.load_mnist(tiny_dir, download_missing=False)


def test_verify_false_does_not_skip_official_size(tmp_path):
    # A file that claims to be the official test labels (10000 of them) is checked anyway.
    write_dataset(tmp_path, 20, 10_000)
    with pytest.warns(UserWarning), pytest.raises(MNISTError, match="wrong SHA-256"):
        mnist.load_mnist(tmp_path, download_missing=False, verify=False)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file(tmp_path, gz):
    write_dataset(tmp_path, 20, 10, gz=gz)
    name = mnist.FILES["train_images"].name + (".gz" if gz else "")
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(MNISTError, match="truncated"):
        load_unverified(tmp_path)


def test_truncated_header(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    (tmp_path / mnist.FILES["test_labels"].name).write_bytes(b"\x00\x00\x08\x01\x00")
    with pytest.raises(MNISTError, match="truncated"):
        load_unverified(tmp_path)


def test_trailing_bytes(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    path = tmp_path / mnist.FILES["test_labels"].name
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(MNISTError, match="trailing bytes"):
        load_unverified(tmp_path)


def test_wrong_magic(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    # Labels where images belong: magic 2049 instead of 2051.
    images = tmp_path / mnist.FILES["train_images"].name
    mnist.write_idx(images, np.zeros(20, np.uint8))
    with pytest.raises(MNISTError, match="wrong magic number.*2049.*expected 2051"):
        load_unverified(tmp_path)


def test_count_mismatch(tmp_path):
    write_dataset(tmp_path, 20, 10, gz=False)
    mnist.write_idx(tmp_path / mnist.FILES["train_labels"].name, np.zeros(19, np.uint8))
    with pytest.raises(
        MNISTError, match="train images and labels differ in count: 20 images.*19 labels"
    ):
        load_unverified(tmp_path)


def test_search_order(tmp_path, monkeypatch):
    first = write_dataset(tmp_path / "given", 20, 10)
    second = write_dataset(tmp_path / "env", 30, 10)
    monkeypatch.setenv("JBN_DATA_DIR", str(second))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # A given directory is the only one; without one, $JBN_DATA_DIR, the repository's
    # copy, then the cache.
    cache = tmp_path / "cache" / "jbn" / "mnist"
    assert mnist.candidate_dirs(first) == [first]
    assert mnist.candidate_dirs(None) == [second, REAL_MNIST, cache]
    assert len(load_unverified(first).train_labels) == 20
    assert len(load_unverified(None).train_labels) == 30  # from $JBN_DATA_DIR
    monkeypatch.delenv("JBN_DATA_DIR")
    assert mnist.candidate_dirs(None) == [REAL_MNIST, cache]
    # Downloads go only where the user said: the given directory, else $JBN_DATA_DIR.
    assert mnist.download_dir(None) is None
    monkeypatch.setenv("JBN_DATA_DIR", str(second))
    assert mnist.download_dir(None) == second and mnist.download_dir(first) == first


def test_shipped_copy_is_found_from_the_package_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mnist.SHIPPED_DIR == REAL_MNIST and REAL_MNIST.is_absolute()
    found = mnist.find_files([mnist.SHIPPED_DIR])
    assert found is not None
    assert {p.name for p in found.values()} == {s.name + ".gz" for s in mnist.FILES.values()}


def test_shipped_files_are_plain_git_files():
    # A plain clone holds the bytes: gzip files, not Git LFS pointers, tracked and not ignored.
    attributes = REPO / ".gitattributes"
    assert not attributes.exists() or "lfs" not in attributes.read_text()
    for spec in mnist.FILES.values():
        path = REAL_MNIST / (spec.name + ".gz")
        assert path.read_bytes()[:2] == b"\x1f\x8b", f"{path} is not a gzip file"
    # The notice beside the files and in the README: the source and the data's own licence.
    for notice in (REAL_MNIST / "README.md", REPO / "README.md"):
        text = " ".join(notice.read_text().split())
        assert "Creative Commons Attribution-Share Alike 3.0" in text, notice
        assert all(name in text for name in ("LeCun", "Cortes", "Burges")), notice
    if shutil.which("git") and (REPO / ".git").exists():
        names = [f"data/mnist/{s.name}.gz" for s in mnist.FILES.values()]
        tracked = subprocess.run(
            ["git", "ls-files", "--", *names], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        assert sorted(tracked) == sorted(names)
        ignored = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=REPO)
        assert ignored.returncode == 1  # none of them ignored


def test_fresh_clone_finds_the_data_offline(tmp_path):
    # As a new user on a machine without network: HOME empty, no $JBN_DATA_DIR, no cache,
    # the working directory elsewhere, every download refused. The shipped copy is read.
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("JBN_DATA_DIR", "XDG_CACHE_HOME")}
    dead = "http://127.0.0.1:9"  # port 9 (discard) on localhost: refused at once
    env.update(
        HOME=str(home), PYTHONPATH=str(REPO), http_proxy=dead, https_proxy=dead, all_proxy=dead
    )
    code = (
        "from mnist_demo import mnist\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('download attempted')\n"
        "mnist.download = refuse\n"
        "ds = mnist.load_mnist()\n"
        "print(ds.train_images.shape, ds.test_labels.shape)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"MNIST from {REAL_MNIST}", "(60000, 28, 28) (10000,)"]
    assert not any(home.iterdir())  # nothing written into the home directory


def test_corrupt_shipped_file_is_one_clear_error(tmp_path, monkeypatch):
    # A copy of data/mnist with one label changed: the checksum catches it, and the error
    # names the file and says how to restore the shipped copy.
    clone = tmp_path / "clone" / "data" / "mnist"
    clone.mkdir(parents=True)
    for spec in mnist.FILES.values():
        (clone / (spec.name + ".gz")).symlink_to(REAL_MNIST / (spec.name + ".gz"))
    labels = clone / (mnist.FILES["test_labels"].name + ".gz")
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # still a digit: only the checksum can tell
    labels.unlink()
    labels.write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setattr(mnist, "SHIPPED_DIR", clone)
    monkeypatch.delenv("JBN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(MNISTError) as info:
        mnist.load_mnist(None, log=lambda s: None)
    msg = str(info.value)
    assert msg.startswith(f"{labels}: wrong SHA-256 of the uncompressed content")
    assert mnist.FILES["test_labels"].sha256 in msg
    assert "git checkout -- data/mnist" in msg and "download" not in msg


def test_given_data_dir_is_the_only_place(tmp_path, monkeypatch):
    # A complete data set elsewhere in the search order is not used for a given directory.
    monkeypatch.setenv("JBN_DATA_DIR", str(write_dataset(tmp_path / "env", 20, 10)))
    with pytest.raises(MNISTNotFoundError) as info:
        mnist.load_mnist(tmp_path / "nonexistent", download_missing=False)
    msg = str(info.value)
    assert str(tmp_path / "nonexistent") in msg and "no such directory" in msg
    assert str(tmp_path / "env") not in msg


def test_log_names_the_directory(tmp_path):
    write_dataset(tmp_path, 20, 10)
    lines = []
    load_unverified(tmp_path, log=lines.append)
    assert lines == [f"MNIST from {tmp_path}"]


def test_missing_message_names_the_missing_file(tmp_path, monkeypatch):
    write_dataset(tmp_path, 20, 10)
    (tmp_path / (mnist.FILES["test_labels"].name + ".gz")).unlink()
    with pytest.raises(MNISTNotFoundError) as info:
        mnist.load_mnist(tmp_path, download_missing=False)
    msg = str(info.value)
    assert f"{tmp_path}: missing t10k-labels-idx1-ubyte(.gz)" in msg
    assert "train-images-idx3-ubyte(.gz)" not in msg.split(f"{tmp_path}:")[1]


def test_offline_no_data_message(no_mnist_anywhere, monkeypatch):
    # $JBN_DATA_DIR names a directory without the files: the download into it fails.
    named = no_mnist_anywhere / "named"
    monkeypatch.setenv("JBN_DATA_DIR", str(named))
    t0 = time.time()
    with pytest.raises(MNISTNotFoundError) as info:
        mnist.load_mnist(None, timeout=5, log=lambda s: None)
    assert time.time() - t0 < 30
    msg = str(info.value)
    for spec in mnist.FILES.values():
        assert spec.name + ".gz" in msg
    assert str(no_mnist_anywhere / "cache" / "jbn" / "mnist") in msg
    assert f"{mnist.SHIPPED_DIR}: no such directory" in msg and "git checkout" in msg
    assert "JBN_DATA_DIR" in msg and "--data-dir" in msg
    assert "download failed" in msg and "127.0.0.1:9" in msg
    # Nothing half-downloaded is left behind.
    assert not named.exists() or not any(named.iterdir())


def test_no_download_into_an_unnamed_directory(no_mnist_anywhere, monkeypatch):
    # Without --data-dir or $JBN_DATA_DIR nothing is downloaded (not into the cache, not
    # into the repository): the error says how to name a directory.
    monkeypatch.setattr(mnist, "download", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(MNISTNotFoundError) as info:
        mnist.load_mnist(None, log=lambda s: None)
    msg = str(info.value)
    assert "no directory named to download into" in msg
    assert "--data-dir DIR" in msg and "JBN_DATA_DIR=DIR" in msg
    assert not (no_mnist_anywhere / "cache").exists()


def test_no_download_message(no_mnist_anywhere):
    with pytest.raises(MNISTNotFoundError, match="downloading disabled"):
        mnist.load_mnist(None, download_missing=False)


def test_download_rejects_bad_file(tmp_path):
    # A mirror serving a corrupt file: rejected, nothing left in the target directory.
    mirror = tmp_path / "mirror"
    write_dataset(mirror, 20, 10)
    target = tmp_path / "target"
    with pytest.raises(MNISTNotFoundError, match="wrong SHA-256"):
        mnist.download(target, mirrors=(mirror.as_uri() + "/",), log=lambda s: None)
    assert not any(target.iterdir())


def test_download_removes_leftover_tmp(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    stale = target / "t10k-labels-idx1-ubyte.gz.abc123.tmp"
    stale.write_bytes(b"half a download")
    mirror = tmp_path / "mirror"
    write_dataset(mirror, 20, 10)
    with pytest.raises(MNISTNotFoundError):
        mnist.download(target, mirrors=(mirror.as_uri() + "/",), log=lambda s: None)
    assert not stale.exists()


def test_download_from_mirror(tmp_path):
    # A file:// mirror with the real files (the shipped copy) stands in for the network.
    mirror = REAL_MNIST.as_uri() + "/"
    target = tmp_path / "target"
    paths = mnist.download(
        target, mirrors=("http://127.0.0.1:9/", mirror), timeout=5, log=lambda s: None
    )
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in paths.values())
    ds = mnist.load_mnist(target, download_missing=False)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_labels.shape == (10000,)
    umask = os.umask(0)
    os.umask(umask)
    for p in paths.values():  # the user's normal mode, not mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------
# Atomic writes.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gets_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.atomic_write(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_without_fchmod(tmp_path, monkeypatch):
    # Windows has no os.fchmod: the mode is set through the path.
    monkeypatch.delattr(os, "fchmod", raising=False)
    old = os.umask(0o027)
    try:
        files.atomic_write(tmp_path / "a.bin", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def reject(tmp):
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        files.atomic_write(path, b"new", verify=reject)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_remove_stale_tmp(tmp_path):
    (tmp_path / "checkpoint.msgpack.x1y2.tmp").write_bytes(b"x")
    (tmp_path / "other.txt.tmp").write_bytes(b"x")  # not one of ours: kept
    removed = files.remove_stale_tmp(tmp_path, ["checkpoint.msgpack"])
    assert [p.name for p in removed] == ["checkpoint.msgpack.x1y2.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["other.txt.tmp"]
