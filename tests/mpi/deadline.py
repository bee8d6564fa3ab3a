"""A receive deadline expires while rank 1 is late; the late message still arrives intact.

Run: ``mpiexec -n 2 python -m mpi4py tests/mpi/deadline.py``
"""

from __future__ import annotations

import time

import _common
from mpi4py import MPI

from alignfl_mpi.messages import Tag
from alignfl_mpi.transport import Transport

DELAY_S = 1.5
TIMEOUT_S = 0.3


def main() -> None:
    comm = MPI.COMM_WORLD.Dup()
    transport = Transport(comm)
    failures: list[str] = []
    comm.Barrier()  # start the clocks together
    if comm.size < 2:
        failures.append("needs at least 2 ranks")
    elif comm.rank == 0:
        failures += wait_for_late_sender(transport)
    elif comm.rank == 1:
        time.sleep(DELAY_S)
        transport.send_payload(0, _common.make_update(client_id=1, round=2))
    _common.finish(comm, "deadline", failures)


def wait_for_late_sender(transport: Transport) -> list[str]:
    failures: list[str] = []
    start = time.monotonic()
    early = transport.recv(source=1, tag=Tag.UPDATE, timeout=TIMEOUT_S)
    waited = time.monotonic() - start
    print(f"first recv returned {early!r} after {waited:.3f} s", flush=True)
    if early is not None:
        failures.append(
            f"expected None before the deadline, got a message from rank {early.source}"
        )
    if not TIMEOUT_S <= waited < TIMEOUT_S + 0.7:
        failures.append(f"recv(timeout={TIMEOUT_S}) returned after {waited:.3f} s")
    late = transport.recv(source=1, tag=Tag.UPDATE, timeout=30)
    arrived = time.monotonic() - start
    print(f"late message after {arrived:.3f} s", flush=True)
    if late is None or not late.ok:
        return failures + [f"late message missing or rejected: {late and late.error}"]
    if arrived < DELAY_S - 0.5:
        failures.append(f"late message arrived after only {arrived:.3f} s")
    failures += _common.same_update(late.payload, _common.make_update(client_id=1, round=2))
    return failures


if __name__ == "__main__":
    main()
