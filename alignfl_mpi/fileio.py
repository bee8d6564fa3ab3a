"""Atomic writes: a temporary file (or folder) beside the target, then one rename.

Readers see the old file or the new one, never half of one: a crash or an exception
while writing leaves the target as it was and removes the temporary. The temporary is
created with :func:`tempfile.mkstemp` (mode 0600); before the rename it gets the mode the
caller asks for, masked by the umask as :func:`open` would do it, so a file written
atomically has the same permissions as one written in place.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> with atomic_path(folder / "a.txt") as tmp:
...     _ = tmp.write_text("new")
>>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
('new', ['a.txt'])
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "current_umask"]


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it.

    Linux reports it in ``/proc/self/status``; elsewhere it is set and restored
    (not thread-safe, as always with ``os.umask``).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(final: str | os.PathLike[str], *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it onto ``final``.

    The parent folder is created if missing. The temporary file exists (empty) when the
    block starts; write it by name (``h5py.File(tmp, "w")``, ``torch.save(obj, tmp)``).

    Args:
        final: The file to write.
        mode: Permissions of the written file, masked by the umask (``0o666``: as
            :func:`open` creates files; ``0o600``: private to the owner).

    Yields:
        The temporary path.

    Raises:
        Whatever the block raises; the temporary file is removed and ``final`` is left
        as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: str | os.PathLike[str], *, mode: int = 0o777) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``.

    An existing ``final`` folder is removed just before the rename (a folder cannot be
    renamed onto a non-empty one), so only that short step is not atomic.

    Args:
        final: The folder to write.
        mode: Permissions of the folder, masked by the umask.

    Yields:
        The temporary folder.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_dir(root / "d") as tmp:
    ...     _ = (tmp / "f").write_text("x")
    >>> sorted(p.name for p in (root / "d").iterdir()), len(list(root.iterdir()))
    (['f'], 1)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, mode & ~current_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
