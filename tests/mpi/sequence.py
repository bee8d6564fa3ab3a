"""Several ``alignfl-mpi`` invocations in ONE launch, one after another.

Usage: mpiexec -n N python tests/mpi/sequence.py PLAN.json

Each rank imports torch once for all of them; every launch of its own would import it
again on every rank (about 3.6 CPU-seconds per rank with the optimizer's torch._dynamo),
which is most of what a tiny test run costs. PLAN::

    {"out": DIR, "steps": [{"name": NAME, "argv": ["run", ...], "before": [ACTION, ...]}]}

For each step, rank 0 first performs its ``before`` actions (file-system changes between
runs), then every rank runs ``cli.main(argv)`` on its own duplicate of ``COMM_WORLD``, with
its stdout and stderr in ``DIR/NAME.rank{R}.log`` and its exit status in
``DIR/NAME.rank{R}.rc``. The ranks meet before and after each step. ACTION is one of:

* ``["copy", SRC, DST]`` (nothing when SRC does not exist);
* ``["rmtree", PATH]``;
* ``["unlink", FOLDER, GLOB]``;
* ``["list", FOLDER, GLOB, JSON]``: the sorted names matching GLOB, written to JSON.

A step that aborts the job (``MPI_Abort``) ends the launch: put it last.
"""

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mpi4py import MPI  # noqa: E402

from alignfl_mpi import cli  # noqa: E402
from alignfl_mpi.transport import gentle_barrier  # noqa: E402


def perform(action):
    kind, *args = action
    if kind == "copy":
        if Path(args[0]).exists():
            shutil.copy(args[0], args[1])
    elif kind == "rmtree":
        shutil.rmtree(args[0], ignore_errors=True)
    elif kind == "unlink":
        for path in Path(args[0]).glob(args[1]):
            path.unlink()
    elif kind == "list":
        names = sorted(p.name for p in Path(args[0]).glob(args[1]))
        Path(args[2]).write_text(json.dumps(names))
    else:
        raise SystemExit(f"unknown action {kind!r}")


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(plan["out"])
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    for step in plan["steps"]:
        if rank == 0:
            for action in step.get("before", []):
                perform(action)
        gentle_barrier(world)
        comm = world.Dup()
        name = step["name"]
        with open(out / f"{name}.rank{rank}.log", "w", encoding="utf-8") as fh, \
                contextlib.redirect_stderr(fh), contextlib.redirect_stdout(fh):
            try:
                code = cli.main(step["argv"], comm=comm)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                root = logging.getLogger()  # its handler writes to this step's file
                for handler in list(root.handlers):
                    handler.flush()
                    root.removeHandler(handler)
        (out / f"{name}.rank{rank}.rc").write_text(str(code))
        comm.Free()
        gentle_barrier(world)


if __name__ == "__main__":
    main()
