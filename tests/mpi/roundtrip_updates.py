"""Ranks 1..N-1 each send a ~2 MB ClientUpdate to rank 0, which gets them in any order.

Run: ``mpiexec -n 4 python -m mpi4py tests/mpi/roundtrip_updates.py``
"""

from __future__ import annotations

import time

import _common
from mpi4py import MPI

from alignfl_mpi.messages import ClientUpdate, Tag
from alignfl_mpi.transport import Transport

N_ROWS, N_COLS = 512, 1024  # 2 MiB of float32


def main() -> None:
    comm = MPI.COMM_WORLD.Dup()
    transport = Transport(comm)
    failures: list[str] = []
    if comm.size < 2:
        failures.append("needs at least 2 ranks")
    elif comm.rank == 0:
        failures += receive_all(transport)
    else:
        time.sleep(0.05 * (comm.size - comm.rank))  # the highest rank tends to arrive first
        update = _common.make_update(client_id=comm.rank, n_rows=N_ROWS, n_cols=N_COLS, round=4)
        nbytes = transport.send_payload(0, update)
        if nbytes < 2 * 2**20:
            failures.append(f"update is only {nbytes} bytes")
    _common.finish(comm, "roundtrip_updates", failures)


def receive_all(transport: Transport) -> list[str]:
    failures: list[str] = []
    expected = set(range(1, transport.size))
    arrivals: list[int] = []
    while expected - set(arrivals):
        got = transport.recv(tag=Tag.UPDATE, timeout=60)
        if got is None:
            return failures + [f"timed out waiting for ranks {sorted(expected - set(arrivals))}"]
        if not got.ok:
            failures.append(f"rank {got.source}: {got.error}")
        elif got.source in arrivals:
            failures.append(f"second update from rank {got.source}")
        else:
            assert isinstance(got.payload, ClientUpdate)
            want = _common.make_update(client_id=got.source, n_rows=N_ROWS, n_cols=N_COLS, round=4)
            failures += [f"rank {got.source}: {p}" for p in _common.same_update(got.payload, want)]
        arrivals.append(got.source)
    print(f"arrival order {arrivals}", flush=True)
    if transport.recv(timeout=0.2) is not None:
        failures.append("unexpected extra message")
    return failures


if __name__ == "__main__":
    main()
