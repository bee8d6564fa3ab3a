"""Pipelined rounds (``server.pipeline = true``) against synchronous rounds, same config, in
one benchmark run, with a bit-for-bit check of the two results. Run by hand, not in the
tests:

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py --clients 20 --ranks 3 --rounds 3

Runs ``mpiexec -n RANKS alignfl-mpi run`` twice per repeat (synchronous, then pipelined;
``--repeats`` alternates further pairs), ALIGN-FL with ``data.scheme`` (default
``dirichlet``), ``local_epochs``, ``server.epochs`` (default 1), ``server.pool_size = 2000``,
``server.quality_metrics = false``, ``output.png = false`` (see ``bench_clients.py``).

Per round it prints, side by side, the results' timings (``collect``, the server's part
``sampling + server_training + evaluation + io``, ``round``) and the *period*: seconds
between consecutive round lines of rank 0 as they arrived (the first from the "clients
ready" line). With pipelining a round's ``round`` timing starts when its TRAIN went out,
during the previous round's server work, so rounds overlap and their sum overstates the
time; the periods and the rounds' wall time (ready line to last round line) do not. The
ratio is pipelined / synchronous rounds wall time. CPU seconds of every rank over the
same window are printed too (the machine may be shared: wall times move with its load).

The two results must be identical: the final global weights, every client's final
decoder and prior, the per-round server loss, evaluation and client losses, compared
bit for bit; the benchmark exits with status 1 if not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clients import (  # noqa: E402
    REPO,
    RunRecord,
    Workspace,
    ensure_partition,
    overrides,
    timed_run,
)

SERVER_PARTS = ("sampling", "server_training", "evaluation", "io")


def differences(a: RunRecord, b: RunRecord) -> list[str]:
    """What differs between the two runs' results (empty: identical bit for bit)."""
    ra, rb = a.results, b.results
    out = []
    _, ga = ra.final_global()
    _, gb = rb.final_global()
    if sorted(ga) != sorted(gb):
        out.append("final global: different parameter names")
    out += [f"final global {k}" for k in ga if k in gb and not np.array_equal(ga[k], gb[k])]
    da, db = ra.final_decoders(), rb.final_decoders()
    if sorted(da) != sorted(db):
        out.append("final decoders: different clients")
    for c in set(da) & set(db):
        for part in ("state", "prior"):
            for k, v in da[c][part].items():
                if not np.array_equal(v, db[c][part].get(k)):
                    out.append(f"client {c} final decoder {part} {k}")
        if da[c]["round"] != db[c]["round"]:
            out.append(f"client {c} final decoder round")
    for table in ("server", "eval"):
        ta, tb = getattr(ra, table), getattr(rb, table)
        for k in sorted(set(ta) | set(tb)):
            if k not in ta or k not in tb or not np.array_equal(ta[k], tb[k], equal_nan=True):
                out.append(f"{table} {k}")
    for c in ra.clients:
        for k in ("status", "loss", "recon", "kl", "n_samples"):
            va, vb = ra.clients[c].get(k), rb.clients.get(c, {}).get(k)
            if va is None and vb is None:
                continue
            if va is None or vb is None or list(va) != list(vb):
                out.append(f"client {c} {k}")
    return out


def server_part(rec: RunRecord) -> np.ndarray:
    return sum(np.asarray(rec.results.timings[k]) for k in SERVER_PARTS)


def report(sync: RunRecord, pipe: RunRecord) -> dict[str, float]:
    ts, tp = sync.results.timings, pipe.results.timings
    ps, pp = sync.periods(), pipe.periods()
    ss, sp = server_part(sync), server_part(pipe)
    print("| round | collect sync | collect pipe | server sync | server pipe | round sync | "
          "round pipe | period sync | period pipe | period ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(sync.results.rounds):
        print(f"| {r} | {ts['collect'][i]:.2f} | {tp['collect'][i]:.2f} | {ss[i]:.2f} | "
              f"{sp[i]:.2f} | {ts['round'][i]:.2f} | {tp['round'][i]:.2f} | {ps[i]:.2f} | "
              f"{pp[i]:.2f} | {pp[i] / ps[i]:.2f} |")
    ranks = list(range(sync.n_ranks))
    row = {"sync_wall": sync.rounds_wall_s, "pipe_wall": pipe.rounds_wall_s,
           "sync_cpu": sync.window_cpu(ranks), "pipe_cpu": pipe.window_cpu(ranks),
           "sync_server": float(ss.sum()), "pipe_server": float(sp.sum()),
           "sync_collect": float(np.sum(ts["collect"])),
           "pipe_collect": float(np.sum(tp["collect"]))}
    row["ratio"] = row["pipe_wall"] / row["sync_wall"]
    for name, t in (("synchronous", ts), ("pipelined", tp)):
        print(f"{name}: server phases summed over rounds, wall s: " + ", ".join(
            f"{k} {float(np.sum(t[k])):.2f}" for k in SERVER_PARTS))
    print(f"| all | {row['sync_collect']:.2f} | {row['pipe_collect']:.2f} | "
          f"{row['sync_server']:.2f} | {row['pipe_server']:.2f} | "
          f"{float(np.sum(ts['round'])):.2f} | {float(np.sum(tp['round'])):.2f} | "
          f"{row['sync_wall']:.2f} | {row['pipe_wall']:.2f} | {row['ratio']:.2f} |")
    print(f"rounds wall (ready line to last round line): synchronous {row['sync_wall']:.2f} s, "
          f"pipelined {row['pipe_wall']:.2f} s, ratio {row['ratio']:.3f}; all ranks' CPU in "
          f"that window {row['sync_cpu']:.2f} / {row['pipe_cpu']:.2f} cpu s; load "
          f"{sync.load[0]:.1f}->{sync.load[1]:.1f} / {pipe.load[0]:.1f}->{pipe.load[1]:.1f}; "
          f"jobs {sync.wall_s:.1f} / {pipe.wall_s:.1f} s wall")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--server-epochs", type=int, default=1)
    parser.add_argument("--scheme", default="dirichlet")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--verbose", action="store_true", help="echo the runs' stderr")
    args = parser.parse_args(argv)
    args.data_root = args.data_root.resolve()
    sets = overrides(args.clients, scheme=args.scheme, rounds=args.rounds,
                     local_epochs=args.local_epochs,
                     extra=(f"server.epochs={args.server_epochs}",))
    ensure_partition(sets, args.data_root)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {os.cpu_count()} cores | load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} | torch {torch.__version__} | "
          f"{args.clients} clients ({args.scheme}), {args.ranks} ranks, {args.rounds} rounds, "
          f"{args.local_epochs} local epoch(s), {args.server_epochs} server epoch(s)",
          flush=True)
    ws = Workspace(keep=args.keep)
    rows, identical = [], True
    try:
        for rep in range(args.repeats):
            sync = timed_run(ws, "sync", args.ranks, sets, args)
            pipe = timed_run(ws, "pipe", args.ranks, [*sets, "server.pipeline=true"], args)
            print(f"\n[{rep}] synchronous against pipelined")
            rows.append(report(sync, pipe))
            diff = differences(sync, pipe)
            identical &= not diff
            print("results identical bit for bit (final global, final decoders and priors, "
                  "server, eval and client metrics per round)" if not diff else
                  f"RESULTS DIFFER: {', '.join(diff[:20])}", flush=True)
    finally:
        ws.close()
    if len(rows) > 1:
        print(f"median ratio {statistics.median(r['ratio'] for r in rows):.3f}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
