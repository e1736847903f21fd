"""Writing output files atomically, with the user's normal file mode.

A write that fails (a full disk, a permission taken away mid-run) raises
:class:`WriteError`, which names the file; the file is left as it was.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """An output file could not be written; the file, if it existed, is unchanged.

    Attributes:
      path: The file that was being written.
    """

    def __init__(self, path: str | os.PathLike[str], cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path = pathlib.Path(path)

    def __str__(self) -> str:
        return f"could not write {self.path}: {self.strerror}"


def _default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(
    path: str | os.PathLike[str],
    source: bytes | BinaryIO,
    *,
    verify: Callable[[str], object] | None = None,
) -> None:
    """Writes bytes, or copies a binary stream, to ``path`` atomically.

    The data go to a temporary file beside ``path`` (``<name>.<random>.tmp``),
    which ``verify(tmp_path)`` may check, and is then renamed over ``path``: on
    any failure ``path`` is left as it was and the temporary file is removed.
    The file gets the mode a plain ``open()`` would give it (``0o666`` less the
    umask), not ``mkstemp``'s private ``0o600``.

    Args:
      path: Destination; its directory is created if needed.
      source: The bytes, or a binary stream to copy.
      verify: Called with the temporary file's path before the rename; raising
        aborts the write.

    Raises:
      WriteError: If the file could not be written (an ``OSError``: full disk,
        no permission, ...); ``path`` is unchanged.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        os.chmod(tmp, _default_mode())  # by path: os.fchmod does not exist on Windows
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, (bytes, bytearray)):
                out.write(source)
            else:
                shutil.copyfileobj(source, out)
            out.flush()
            os.fsync(out.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise


def remove_stale_tmp(directory: str | os.PathLike[str], names: list[str]) -> list[pathlib.Path]:
    """Removes temporary files that a killed :func:`atomic_write` of ``names`` left behind.

    Args:
      directory: Where the files are written.
      names: File names whose ``<name>.*.tmp`` leftovers to remove.

    Returns:
      The removed paths.
    """
    directory = pathlib.Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for name in names:
        for tmp in directory.glob(f"{name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
