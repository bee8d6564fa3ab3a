"""Runtime overhead per round: round wall time minus the work the algorithm must do.

    overhead = round - (client_training + sampling + server_training + evaluation)

``client_training`` is the slowest answering client's own training time (the critical
path), so overhead holds message transfer, decoding and validation, waiting on MPI,
writing results and checkpoints. Run by hand, not in the tests:

    python benchmarks/bench_overhead.py --results runs/alignfl/results.h5
    python benchmarks/bench_overhead.py --np 6 -- --data-root data --rounds 2 \
        --set client.local_epochs=2 --output runs/bench-overhead

The second form launches ``mpiexec -n NP alignfl-mpi run ARGS`` first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignfl_mpi.results import load  # noqa: E402

WORK = ("client_training", "sampling", "server_training", "evaluation")


def report(path: Path) -> float:
    res = load(path)
    t = res.timings
    print(f"{path}: {len(res.rounds)} rounds")
    print(f"{'round':>5} {'wall s':>8} {'clients':>8} {'sample':>7} {'server':>7} {'eval':>7} "
          f"{'comm':>7} {'io':>6} {'overhead':>9} {'share':>7}")
    shares = []
    for i, r in enumerate(res.rounds):
        work = sum(t[k][i] for k in WORK)
        over = t["round"][i] - work
        shares.append(over / t["round"][i])
        print(f"{r:>5} {t['round'][i]:>8.2f} {t['client_training'][i]:>8.2f} "
              f"{t['sampling'][i]:>7.3f} {t['server_training'][i]:>7.2f} "
              f"{t['evaluation'][i]:>7.2f} {t['communication'][i]:>7.3f} {t['io'][i]:>6.3f} "
              f"{over:>9.3f} {100 * shares[-1]:>6.2f}%")
    mean = float(np.mean(shares))
    print(f"mean overhead share: {100 * mean:.2f}% of round wall time "
          f"({'meets' if mean < 0.05 else 'MISSES'} the < 5% target)")
    return mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, help="analyse an existing results file")
    parser.add_argument("--np", type=int, default=6, help="ranks to launch (default 6)")
    parser.add_argument("run_args", nargs="*", help="arguments for 'alignfl-mpi run'")
    args = parser.parse_args()
    if args.results is None:
        exe = shutil.which("alignfl-mpi") or str(Path(sys.executable).parent / "alignfl-mpi")
        mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [mpiexec, "-n", str(args.np), exe, "run", *args.run_args]
        print("$", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
        out = "runs/alignfl"
        if "--output" in args.run_args:
            out = args.run_args[args.run_args.index("--output") + 1]
        args.results = Path(out) / "results.h5"
    report(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
