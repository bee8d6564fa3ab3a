"""Bad messages become error Receiveds naming their sender, and the queue stays usable.

Rank 1 sends a buffer with bad magic under a valid tag, then a valid encoding under an
unknown tag; rank 2 (larger limit) sends an update over rank 0's limit; rank 3 sends an
update with NaN in a decoder tensor. Each then sends a good update, which rank 0 must
receive intact after the bad ones from the same rank.

Run: ``mpiexec -n 4 python -m mpi4py tests/mpi/rejection.py``
"""

from __future__ import annotations

import _common
import numpy as np
from mpi4py import MPI

from alignfl_mpi.messages import Tag, encode_message
from alignfl_mpi.transport import Transport

RECEIVER_LIMIT = 2**20
BIG = {"n_rows": 512, "n_cols": 1024}  # 2 MiB of float32: over RECEIVER_LIMIT

# what rank 0 must see from each rank, in order: a substring of the error, or None for good
EXPECTED = {
    1: ["bad magic", "unknown tag", None],
    2: [f"over the limit of {RECEIVER_LIMIT}", None],
    3: ["non-finite values in state/fc.weight (1 NaN, 0 Inf)", None],
}


def main() -> None:
    comm = MPI.COMM_WORLD.Dup()
    failures: list[str] = []
    if comm.size < 4:
        failures.append("needs at least 4 ranks")
    elif comm.rank == 0:
        failures += receive(Transport(comm, max_message_bytes=RECEIVER_LIMIT))
    elif comm.rank in EXPECTED:
        send_bad_then_good(comm)
    _common.finish(comm, "rejection", failures)


def send_bad_then_good(comm: MPI.Comm) -> None:
    transport = Transport(comm, max_message_bytes=8 * 2**20)
    if comm.rank == 1:
        comm.Send([b"NOTAFL1!" * 8, MPI.BYTE], dest=0, tag=int(Tag.UPDATE))
        valid = encode_message(_common.make_update(client_id=1).to_message())
        comm.Send([valid, MPI.BYTE], dest=0, tag=4242)
    elif comm.rank == 2:
        transport.send_payload(0, _common.make_update(client_id=2, **BIG))
    else:
        update = _common.make_update(client_id=3)
        update.state["fc.weight"][2, 3] = np.nan
        transport.send_payload(0, update)
    transport.send_payload(0, _common.make_update(client_id=comm.rank))


def receive(transport: Transport) -> list[str]:
    failures: list[str] = []
    seen: dict[int, list] = {rank: [] for rank in EXPECTED}
    for _ in range(sum(len(v) for v in EXPECTED.values())):
        got = transport.recv(timeout=60)
        if got is None:
            return failures + [f"timed out; received so far: {seen}"]
        print(f"from rank {got.source}: {'ok' if got.ok else got.error}", flush=True)
        if got.source not in seen:
            failures.append(f"message from unexpected rank {got.source}")
            continue
        step = len(seen[got.source])
        seen[got.source].append(got)
        want = EXPECTED[got.source][step] if step < len(EXPECTED[got.source]) else "nothing"
        if want is None:
            if not got.ok:
                failures.append(
                    f"rank {got.source} step {step}: good message rejected: {got.error}"
                )
            else:
                diffs = _common.same_update(got.payload, _common.make_update(client_id=got.source))
                failures += [f"rank {got.source} good update: {d}" for d in diffs]
        elif got.ok or want not in str(got.error) or f"rank {got.source}" not in str(got.error):
            failures.append(
                f"rank {got.source} step {step}: expected error {want!r}, got {got.error!r}"
            )
    big = len(encode_message(_common.make_update(client_id=2, **BIG).to_message()))
    if seen[2] and seen[2][0].nbytes != big:
        failures.append(f"oversized message reported {seen[2][0].nbytes} bytes, sent {big}")
    if transport.recv(timeout=0.2) is not None:
        failures.append("unexpected extra message")
    return failures


if __name__ == "__main__":
    main()
