"""Multi-rank transport tests: each script in ``tests/mpi/`` runs under ``mpiexec``.

Every script combines all ranks' verdicts with ``Allreduce`` and exits non-zero on failure;
a run that outlives the timeout counts as a hang and fails.
"""

from __future__ import annotations

import subprocess

import pytest
from mpi_helpers import MPI_SCRIPTS, find_mpiexec, run_mpi

pytestmark = pytest.mark.skipif(
    find_mpiexec() is None, reason="no mpiexec next to sys.executable or on PATH"
)

SCRIPTS = [
    ("roundtrip_updates.py", 4),
    ("rejection.py", 4),
    ("deadline.py", 2),
]


@pytest.mark.parametrize(("script", "n"), SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_mpi_script(script: str, n: int) -> None:
    try:
        proc = run_mpi(MPI_SCRIPTS / script, n, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} on {n} ranks hung for {exc.timeout} s\n{exc.output}\n{exc.stderr}")
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert f"PASS {script.removesuffix('.py')} on {n} ranks" in proc.stdout, report


def test_failing_rank_fails_the_run() -> None:
    """The harness itself can fail: too few ranks makes rank 0 report a failure."""
    proc = run_mpi(MPI_SCRIPTS / "rejection.py", 2, timeout=120)
    assert proc.returncode != 0
    assert "needs at least 4 ranks" in proc.stderr
