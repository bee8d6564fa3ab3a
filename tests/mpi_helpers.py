"""Launch multi-rank test scripts under ``mpiexec`` from pytest.

>>> proc = run_mpi(MPI_SCRIPTS / "deadline.py", 2)  # doctest: +SKIP
>>> proc.returncode  # doctest: +SKIP
0
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPTS = Path(__file__).resolve().parent / "mpi"


def find_mpiexec() -> str | None:
    """Return the ``mpiexec`` next to this Python (the venv's), else the one on PATH, else None."""
    sibling = Path(sys.executable).parent / "mpiexec"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("mpiexec")


@functools.cache
def mpiexec_flags(mpiexec: str) -> tuple[str, ...]:
    """Extra launcher flags: ``--oversubscribe`` for Open MPI, none for MPICH."""
    try:
        proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    text = proc.stdout + proc.stderr
    return ("--oversubscribe",) if "Open MPI" in text or "OpenRTE" in text else ()


def mpi_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for ranks: one thread each, the repository importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def run_mpi(
    script: str | Path,
    n: int,
    *args: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``mpiexec -n N python -m mpi4py SCRIPT ARGS...`` and capture its output.

    ``-m mpi4py`` makes an uncaught exception on any rank abort all ranks at once. The
    launcher runs in its own process group, which is killed if it outlives ``timeout``.

    Args:
        script: Path of the script, or a name inside ``tests/mpi/``.
        n: Number of ranks.
        *args: Arguments for the script.
        timeout: Seconds before the run counts as hung.
        env: Extra environment variables.

    Returns:
        The finished process with ``stdout`` and ``stderr`` as text.

    Raises:
        FileNotFoundError: If there is no ``mpiexec``.
        subprocess.TimeoutExpired: If the run hangs; its output so far is attached.
    """
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise FileNotFoundError("no mpiexec next to sys.executable or on PATH")
    path = Path(script)
    if not path.is_absolute() and not path.exists():
        path = MPI_SCRIPTS / path
    cmd = [
        mpiexec,
        *mpiexec_flags(mpiexec),
        "-n",
        str(n),
        sys.executable,
        "-m",
        "mpi4py",
        str(path),
        *args,
    ]
    return _run_group(cmd, timeout=timeout, env=env)


@dataclass
class StepResult:
    """One step of :func:`run_sequence`, read like a finished process."""

    returncode: int | None
    stderr: str


def run_sequence(n: int, steps: list[dict[str, Any]], folder: Path, *,
                 timeout: float = 300) -> tuple[dict[str, StepResult],
                                                subprocess.CompletedProcess[str]]:
    """Run several ``alignfl-mpi`` invocations in one launch of ``n`` ranks.

    ``steps`` are ``{"name", "argv", "before"}`` dicts (see ``tests/mpi/sequence.py``).
    Returns each step's exit status (rank 0's; the launch's own status for a step that did
    not finish, e.g. one that aborted the job) and the output of all ranks (rank 0 first),
    and the launch itself.

    Raises:
        subprocess.TimeoutExpired: The launch hung.
    """
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"out": str(folder), "steps": steps}))
    proc = run_mpi(MPI_SCRIPTS / "sequence.py", n, str(plan), timeout=timeout)
    results = {}
    for step in steps:
        name = step["name"]
        logs = sorted(folder.glob(f"{name}.rank*.log"),
                      key=lambda p: int(p.name.rsplit(".rank", 1)[1].split(".")[0]))
        text = "".join(log.read_text(encoding="utf-8", errors="replace") for log in logs)
        rc = folder / f"{name}.rank0.rc"
        if rc.exists():
            results[name] = StepResult(int(rc.read_text()), text)
        else:  # the launch ended in or before this step
            results[name] = StepResult(proc.returncode, text + proc.stderr)
    return results, proc


def run_cli(n: int, *args: str, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script: ``mpiexec -n N alignfl-mpi ARGS...``.

    Falls back to ``python -m alignfl_mpi`` when the console script is not installed.
    """
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise FileNotFoundError("no mpiexec next to sys.executable or on PATH")
    script = Path(sys.executable).parent / "alignfl-mpi"
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "alignfl_mpi"]
    cmd = [mpiexec, *mpiexec_flags(mpiexec), "-n", str(n), *program, *args]
    return _run_group(cmd, timeout=timeout, env=env)


def _run_group(cmd: list[str], *, timeout: float,
               env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; kill the whole group if it outlives ``timeout``."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=mpi_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
