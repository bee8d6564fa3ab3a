"""An exclusive lock on a run folder, so that two processes never write one run.

Rank 0 takes the lock before it touches the results file and holds it until it exits;
the kernel releases it however the process ends (``kill -9`` included). The lock file
records the holder's host and pid, which the refusal names.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> lock = RunLock(folder)
>>> lock.acquire()
>>> RunLock(folder).acquire()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
alignfl_mpi.errors.ConfigError: run folder ... is in use by ...
>>> lock.release()
>>> RunLock(folder).acquire()
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = "run.lock"
"""Name of the lock file inside a run folder."""


class RunLock:
    """``flock``-based exclusive lock on ``FOLDER/run.lock``.

    On a shared file system the lock is only as good as its ``flock`` support (NFS v4
    and Lustre with ``flock`` mounted provide it; see docs/DESIGN.md).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        """Prepare (not take) the lock of ``folder``."""
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse with the holder's host and pid.

        Raises:
            ConfigError: Another process holds the lock.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run folder {self.path.parent} is in use by {holder} (lock "
                              f"{self.path}); wait for that run to end or use another "
                              "--output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (also happens when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
