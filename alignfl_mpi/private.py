"""A client's private folder: what must never be where the server (or anyone) reads.

A client's checkpoints hold its encoder, its optimizer state, its privacy accountant and
the secret seed of its DP noise and Poisson sampling. With that seed and the public seeds,
the noise of every release could be regenerated and subtracted, so the folder is:

* outside the run folder (``output.dir``, which rank 0 writes and people share);
* node-local by default: ``$ALIGNFL_PRIVATE_DIR``, else ``$TMPDIR/alignfl-private-<uid>``;
* created with mode 0700 and checked at start (owned by this user, no group/other bits).

Inside it, each run has its own sub-folder named by a hash of the run folder's absolute
path, so ``--resume`` of the same run on the same node finds the client's checkpoints.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> path = ensure_private(root / "p" / "client_0")
>>> oct(path.stat().st_mode & 0o777), oct((root / "p").stat().st_mode & 0o777)
('0o700', '0o700')
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import ConfigError

ENV_VAR = "ALIGNFL_PRIVATE_DIR"
"""Environment variable naming the default private root (e.g. a node-local scratch)."""


def default_private_root() -> Path:
    """``$ALIGNFL_PRIVATE_DIR``, else ``$TMPDIR/alignfl-private-<uid>`` (node-local)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"alignfl-private-{os.getuid()}"


def client_private_dir(private_root: str, output_dir: str, client_id: int) -> Path:
    """The folder of one client of one run.

    Args:
        private_root: The configured ``client.private_dir`` ("" for the default root).
        output_dir: The run folder; its absolute path names the run's sub-folder.
        client_id: The client.

    >>> client_private_dir("/scratch/me", "runs/a", 3).parts[-1]
    'client_3'
    """
    root = Path(private_root) if private_root else default_private_root()
    run_key = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
    return root / f"run-{run_key}" / f"client_{client_id}"


def ensure_private(path: Path) -> Path:
    """Create ``path`` (and its missing parents) with mode 0700; check existing ones.

    Raises:
        ConfigError: A folder on the way is not owned by this user or is open to others.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for folder in missing:
        try:
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # whatever the umask
        except FileExistsError:  # another client of the run made it at the same moment
            pass
    for folder in (path, path.parent):
        info = folder.stat()
        if info.st_uid != os.getuid():
            raise ConfigError(f"private folder {folder} belongs to uid {info.st_uid}, not "
                              f"{os.getuid()}; set client.private_dir to a folder of your own")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"private folder {folder} is open to others (mode "
                              f"{oct(info.st_mode & 0o777)}); chmod 700 it or set "
                              "client.private_dir")
    return path
