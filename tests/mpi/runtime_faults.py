"""Run ``alignfl-mpi run`` with faults injected into the clients' local training.

Usage: mpiexec -n 5 python -m mpi4py tests/mpi/runtime_faults.py CONFIG STRAGGLE_S

* client 1 raises in round 1 (an exception on a client);
* client 2 sends a decoder with a NaN in round 0 (a malformed update);
* client 3 sleeps STRAGGLE_S seconds in round 0 (a straggler past the deadline).
The pytest wrapper reads the results file back and checks what the server made of it.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from alignfl_mpi import cli, runtime  # noqa: E402

config, straggle = sys.argv[1], float(sys.argv[2])
original = runtime.ClientLoop.local_train


def faulty(self, round_):
    if self.client_id == 1 and round_ == 1:
        raise RuntimeError("injected failure in round 1")
    update = original(self, round_)
    if self.client_id == 2 and round_ == 0:
        key = next(iter(update.state))
        update.state[key] = update.state[key].copy()
        update.state[key].flat[0] = np.nan
    if self.client_id == 3 and round_ == 0:
        time.sleep(straggle)
    return update


runtime.ClientLoop.local_train = faulty
sys.exit(cli.main(["run", "--config", config]))
