"""Run ``alignfl-mpi run`` with one failure injected; the job must end by itself.

Usage: mpiexec -n 3 python -m mpi4py tests/mpi/server_faults.py CONFIG FAULT

FAULT:

* ``checkpoint``: rank 0's checkpoint write fails with ENOSPC in round 2 (a full disk);
* ``handle``: rank 0 raises a RuntimeError while recording a client's message in round 2;
* ``client-loop``: client 1's loop breaks outside the training step in round 2;
* ``client-send``: client 1's UPDATE send fails (too big for the transport) in round 2.

Launched without ``-m mpi4py`` so that only the runtime's own handling ends the job.
"""

import errno
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignfl_mpi import cli, runtime  # noqa: E402
from alignfl_mpi.errors import MessageError  # noqa: E402
from alignfl_mpi.messages import Tag  # noqa: E402
from alignfl_mpi.transport import Transport  # noqa: E402

config, fault = sys.argv[1], sys.argv[2]
FAIL_ROUND = 1  # 0-based: the second round

if fault == "checkpoint":
    original_save = runtime.save_checkpoint

    def failing_save(path, state):
        if path.name == runtime.CHECKPOINT_NAME and state.get("round") == FAIL_ROUND:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original_save(path, state)

    runtime.save_checkpoint = failing_save
elif fault == "handle":
    original_handle = runtime.Server.handle

    def failing_handle(self, rcv, r, record):
        if r == FAIL_ROUND:
            raise RuntimeError("injected failure while recording a message")
        return original_handle(self, rcv, r, record)

    runtime.Server.handle = failing_handle
elif fault == "client-loop":
    original_round = runtime.ClientLoop.client_round

    def failing_round(self, instruction):
        if self.client_id == 1 and instruction.round == FAIL_ROUND:
            raise RuntimeError("injected failure outside the training step")
        return original_round(self, instruction)

    runtime.ClientLoop.client_round = failing_round
elif fault == "client-send":
    original_isend = Transport.isend

    def failing_isend(self, dest, tag, msg):
        if self.rank == 2 and tag == Tag.UPDATE and msg.meta.get("round") == FAIL_ROUND:
            raise MessageError("UPDATE message to rank 0 is 9999999 bytes, over the limit")
        return original_isend(self, dest, tag, msg)

    Transport.isend = failing_isend
else:
    raise SystemExit(f"unknown fault {fault!r}")

sys.exit(cli.main(["run", "--config", config]))
