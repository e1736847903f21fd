"""One run owns its output directory: an OS lock on ``<out>/.lock`` while it runs.

The lock is ``fcntl.flock`` on POSIX and ``msvcrt.locking`` on Windows, taken
without waiting: a second run into the same directory is refused at once, with
the process id and host that the lock file names. The operating system releases
the lock when its process ends, however it ends (even ``kill -9``); a lock file
left behind by a killed run is then taken over by the next run. A run that ends
normally (also by an error) removes the file.
"""

from __future__ import annotations

import os
import pathlib
import socket
import sys
import time

#: The lock file's name in the output directory.
LOCK_NAME = ".lock"


class OutInUseError(RuntimeError):
    """Another running process holds the lock of the output directory."""


if sys.platform == "win32":
    import msvcrt

    # The locked byte, far past the owner line: a locked range cannot be read on
    # Windows, and locking beyond the end of a file is allowed.
    _LOCKED_BYTE = 1 << 30

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _is_file_at(fd: int, path: pathlib.Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (an owner removes it on release)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_owner(path: str | os.PathLike[str]) -> str:
    """The owner a lock file names, in words (``pid 123 on host h``), or ``''``."""
    try:
        words = pathlib.Path(path).read_text(errors="replace").split()
    except OSError:
        return ""
    if len(words) == 2 and words[0].isdigit():
        return f"pid {words[0]} on host {words[1]}"
    return ""


class OutLock:
    """The lock of one output directory, held from :meth:`acquire` to :meth:`release`.

    Use it as a context manager, or call the two methods. The file holds one line,
    ``<pid> <host>``, of the process that holds it.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutLock:
        """Takes the lock, or raises at once if another process holds it.

        Raises:
          OutInUseError: If another process holds it; the message names that process.
          OSError: If the lock file cannot be created or locked.
        """
        if self._fd is not None:
            return self
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = _try_lock(fd)
                if locked and _is_file_at(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked:
                raise OutInUseError(self._in_use_message())
            # The owner removed the file between our open and our lock: open the new one.
        else:
            raise OutInUseError(self._in_use_message())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock and removes the file; does nothing if it is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if sys.platform == "win32":
            try:
                _unlock(fd)
            finally:
                os.close(fd)  # the file cannot be removed while open
            try:
                os.unlink(self.path)  # fails (and stays) if another run opened it meanwhile
            except OSError:
                pass
        else:
            try:  # while still locked, so no other run can hold this file meanwhile
                os.unlink(self.path)
            except OSError:
                pass
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def _in_use_message(self) -> str:
        owner = ""
        for _ in range(20):  # the owner writes its line right after it locks
            owner = read_owner(self.path)
            if owner:
                break
            time.sleep(0.05)
        who = f"another run ({owner})" if owner else "another run"
        return (
            f"--out {self.directory} is in use by {who}, which holds {self.path}; "
            "wait for it to end, or choose another --out"
        )

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "OutInUseError", "OutLock", "read_owner"]
