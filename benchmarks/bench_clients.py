"""Many clients per rank: the runtime's client phase against a plain-PyTorch floor, and
strong and weak scaling over client ranks. Run by hand, not in the tests.

**Efficiency against the floor** (``efficiency``). The floor is the same local training
done by plain PyTorch processes with no runtime: one process per core (``--floor-procs``,
default 2), each training its share of the clients one after another, with the same
placement as the run (``placement.place_clients``), the same partition file, model,
seeds, epochs and batch size: ``client.new_local_state``, then per round and client
``begin_round``, ``train_vae`` (collecting the posterior when ``prior_fit_on = "z"``, as
the run does) and ``fit_prior``: exactly the ALIGN-FL client round without MPI, messages,
checkpoints or the outlier-survival probe. Each floor process loads its clients' data
before a shared start (a ``multiprocessing`` barrier), so the floor time is the slowest
process's time from that start to its last client's last round. The run's client phase
is the sum over rounds of the results' ``collect`` timing. Both are measured in the same
benchmark run, alternating (floor, run, floor, run, ...). Efficiency = floor time / the
run's client phase. The benchmark also checks that the floor trained the same models:
every client's last-round ``loss`` must equal the run's bit for bit.

On a shared machine the wall times move with the other jobs' load, so the CPU time is
printed too: the floor's (the sum over its processes) against the client ranks' CPU
time inside the collect phases (each rank's CPU time is read from ``/proc`` every
``--sample-s`` seconds, ranks told apart by ``PMI_RANK``, Linux only; a synchronous
round's collect phase starts at rank 0's previous round line, or its "clients ready"
line, and lasts the ``collect`` timing), and the server rank's CPU time in the same
windows (it shares the cores with the clients), with the load average around each part.
``--also KEY=VALUE`` adds one more run per client count with that setting against the
same floor (e.g. ``output.checkpoint=false``, to see what the checkpoints cost).

    OMP_NUM_THREADS=1 python benchmarks/bench_clients.py efficiency --clients 5 100 \
        --rounds 2 --also output.checkpoint=false

**Strong scaling** (``strong``): ``--strong-clients`` (default 100) clients on 1 and 2
client ranks (``--ranks-list 2 3``: ``mpiexec -n 2`` and ``-n 3``): the client phase per
rank count, its speed-up, and the client ranks' CPU time in the collect phases.

**Weak scaling** (``weak``): ``--clients-per-rank`` clients (default 10) on each of 1 and
2 client ranks, ``iid`` partition. The partition always splits the whole dataset, so with
twice the clients each client has half the samples: ``local_epochs`` is multiplied by the
number of client ranks to keep the work per rank (samples x epochs) fixed.

    OMP_NUM_THREADS=1 python benchmarks/bench_clients.py strong weak --rounds 2 \
        --plot docs/figures/scaling.png

**Checkpoint cost** (``checkpoint``, no MPI): what one client checkpoint costs a rank, as
the runtime writes them: ``--ckpt-clients`` client states (the ``paper`` preset's VAE and
its Adam state after one step), each checkpointed once per round for ``--ckpt-rounds``
rounds into its own folder, the last two kept; each writer in a fresh process, in turn,
``--repeats`` times: ``torch.save`` of ``LocalState.state_dict()`` (how clients wrote them
before, 13.6 MB), the raw format of the same, and the raw format of
``LocalState.checkpoint_state()`` (what ``ClientLoop`` writes now: without Adam's moments,
which the preset's ``fresh_optimizer`` clears at the next round's start; 4.5 MB).
It also reports what touching fresh memory costs against reusing it (a VM may charge the
guest for memory it has not touched recently), the cost a buffered write pays when it
grows the page cache.

    OMP_NUM_THREADS=1 python benchmarks/bench_clients.py checkpoint --ckpt-clients 50 \
        --ckpt-rounds 3 --repeats 2

Every ``mpiexec`` has a timeout (``--timeout``, seconds); on expiry its process group is
killed and the benchmark stops with the command and the last lines of its output.
``--set KEY=VALUE`` (repeatable) adds a setting to every run of every mode, e.g.
``--set 'client.device="cuda"' --set 'server.device="cuda"'`` (the floor stays on the CPU);
``--mpiexec-flag`` (repeatable) passes a flag to ``mpiexec``, e.g. ``--allow-run-as-root``
and ``--oversubscribe`` for Open MPI as root. Where ``alignfl-mpi`` is not installed (a
bare machine running this checkout), the ranks run ``python -m alignfl_mpi`` from the
repository root; the ranks' CPU time is read by ``PMI_RANK`` (MPICH) or
``OMPI_COMM_WORLD_RANK`` (Open MPI).
Common settings (all modes): ``data.scheme`` (``--scheme``), ``rounds``, ``local_epochs``,
``server.epochs = 1``, ``server.pool_size = 2000``, ``server.quality_metrics = false``,
``output.png = false``; the ``paper`` preset otherwise (checkpoints on).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alignfl_mpi.arrays import images_to_tensor  # noqa: E402
from alignfl_mpi.checkpoint import save_checkpoint, save_raw_checkpoint  # noqa: E402
from alignfl_mpi.client import begin_round, fit_prior, new_local_state, train_vae  # noqa: E402
from alignfl_mpi.config import load_config  # noqa: E402
from alignfl_mpi.placement import place_clients  # noqa: E402
from alignfl_mpi.results import Results, load  # noqa: E402
from alignfl_mpi.schema import client_sizes, read_client  # noqa: E402

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else (shutil.which("mpiexec") or "")
ALIGNFL = str(BIN / "alignfl-mpi") if (BIN / "alignfl-mpi").exists() else "alignfl-mpi"
# Without an installed entry point (a bare machine running this checkout), the ranks run
# the package as a module from the repository root.
ALIGNFL_CMD = ([ALIGNFL] if (BIN / "alignfl-mpi").exists() or shutil.which("alignfl-mpi")
               else [sys.executable, "-m", "alignfl_mpi"])
RANK_VARS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=", b"PMIX_RANK=")  # MPICH, Open MPI
ROUND_LINE = re.compile(r"\] round (\d+)/(\d+) \| clients ok ")
READY_LINE = "clients ready"
TICK = os.sysconf("SC_CLK_TCK")


# --- configuration ----------------------------------------------------------------------
def overrides(n_clients: int, *, scheme: str, rounds: int, local_epochs: int,
              extra: tuple[str, ...] = ()) -> list[str]:
    """The ``--set`` values of one run (the floor loads the same config)."""
    return [f"n_clients={n_clients}", f'data.scheme="{scheme}"', f"rounds={rounds}",
            f"client.local_epochs={local_epochs}", "server.epochs=1",
            "server.pool_size=2000", "server.quality_metrics=false", "output.png=false",
            *extra]


def ensure_partition(sets: list[str], data_root: Path) -> Path:
    """The run's partition file, created (untimed) if missing; the floor reads the same."""
    from alignfl_mpi.partition import make_partition
    from alignfl_mpi.runtime import partition_path, partition_request

    cfg = load_config(preset="paper", overrides=[*sets, f'data.data_root="{data_root}"'])
    path = partition_path(cfg)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_partition(partition_request(cfg), output=path, root=data_root)
    return path


# --- the run under mpiexec --------------------------------------------------------------
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def rank_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of every MPI rank under ``root``, by ``PMI_RANK`` (or
    Open MPI's ``OMPI_COMM_WORLD_RANK``)."""
    out: dict[int, float] = {}
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        rank = [e for var in RANK_VARS for e in env if e.startswith(var)][:1]
        if rank and "python" in _comm(pid):
            out[int(rank[0].split(b"=")[1])] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Mark:
    """One progress line of rank 0 as it arrived: seconds since launch, ranks' CPU."""

    line: str
    t: float
    cpu: dict[int, float]


@dataclass
class RunRecord:
    n_ranks: int
    results: Results
    wall_s: float
    marks: list[Mark] = field(default_factory=list)
    children_cpu_s: float = 0.0  # every process of the job (rusage of reaped children)
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average before, after
    samples: list[Mark] = field(default_factory=list)  # every rank's CPU, sampled

    @property
    def collect_s(self) -> float:
        return float(np.sum(self.results.timings["collect"]))

    @property
    def rounds_wall_s(self) -> float:
        """From the "clients ready" line to the last round line."""
        return self.marks[-1].t - self.marks[0].t

    def window_cpu(self, ranks: range | list[int]) -> float:
        """CPU seconds of ``ranks`` from "clients ready" to the last round line."""
        first, last = self.marks[0].cpu, self.marks[-1].cpu
        return sum(last.get(r, 0.0) - first.get(r, 0.0) for r in ranks)

    def cpu_at(self, rank: int, t: float) -> float:
        """CPU seconds of ``rank`` at ``t`` (seconds since launch), interpolated linearly
        between the samples taken every ``--sample-s``."""
        pts = sorted((s.t, s.cpu[rank]) for s in self.samples if rank in s.cpu)
        if not pts:
            return 0.0
        ts, cs = zip(*pts)
        return float(np.interp(t, ts, cs))

    def collect_windows(self) -> list[tuple[float, float]]:
        """Each round's collect phase, synchronous mode: it starts when the previous round
        line (or "clients ready") is logged, the TRAIN going out right after, and lasts
        the results' ``collect`` timing."""
        return [(m.t, m.t + float(c)) for m, c in zip(self.marks,
                                                     self.results.timings["collect"])]

    def collect_cpu(self, ranks: range | list[int]) -> float:
        """CPU seconds of ``ranks`` inside the collect phases (synchronous runs)."""
        return sum(self.cpu_at(r, b) - self.cpu_at(r, a)
                   for a, b in self.collect_windows() for r in ranks)

    def periods(self) -> list[float]:
        """Seconds between consecutive round lines (the first from "clients ready")."""
        return [b.t - a.t for a, b in zip(self.marks, self.marks[1:])]


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the job this benchmark started: its process group, then any descendant left."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_alignfl(n_ranks: int, sets: list[str], *, out_dir: Path, private_dir: Path,
                data_root: Path, timeout: float, verbose: bool = False,
                sample_s: float = 0.5, launcher_flags: tuple[str, ...] = ()) -> RunRecord:
    """``mpiexec -n n_ranks alignfl-mpi run`` with ``sets``; the run's record.

    ``launcher_flags`` go to ``mpiexec`` before ``-n`` (e.g. ``--oversubscribe``).

    Raises:
        RuntimeError: The job timed out (then killed) or exited with an error; the
            message names the command and ends with its last lines of output.
    """
    if not MPIEXEC:
        raise RuntimeError("no mpiexec next to this Python or on PATH")
    cmd = [MPIEXEC, *launcher_flags, "-n", str(n_ranks), *ALIGNFL_CMD, "run",
           "--data-root", str(data_root), "--output", str(out_dir)]
    for value in [*sets, f'client.private_dir="{private_dir}"']:
        cmd += ["--set", value]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    if ALIGNFL_CMD[0] == sys.executable:  # the package from this checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", ""))
                                            if p)
    lines: list[str] = []
    marks: list[Mark] = []
    before = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            now = time.monotonic() - start
            lines.append(line)
            if verbose:
                sys.stderr.write("    | " + line)
            if READY_LINE in line or ROUND_LINE.search(line):
                marks.append(Mark(line.strip(), now, rank_cpu(proc.pid)))

    samples: list[Mark] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(sample_s):
            samples.append(Mark("", time.monotonic() - start, rank_cpu(proc.pid)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        done.set()
        _kill_tree(proc)
        reader.join(5)
        raise RuntimeError(f"timed out after {timeout:.0f} s, killed: {shlex.join(cmd)}\n"
                           + "".join(lines[-30:])) from None
    wall = time.monotonic() - start
    done.set()
    reader.join(30)
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: {shlex.join(cmd)}\n"
                           + "".join(lines[-30:]))
    rounds = [m for m in marks if ROUND_LINE.search(m.line)]
    ready = [m for m in marks if READY_LINE in m.line]
    if not ready or not rounds:
        raise RuntimeError(f"no 'clients ready' or round line on stderr: {shlex.join(cmd)}\n"
                           + "".join(lines[-30:]))
    res = load(out_dir / "results.h5")
    if not res.finished:
        raise RuntimeError(f"results not finished: {out_dir / 'results.h5'}")
    marks = [ready[0], *rounds]
    return RunRecord(n_ranks=n_ranks, results=res, wall_s=wall, marks=marks,
                     load=(before, os.getloadavg()[0]),
                     samples=sorted([*samples, *marks], key=lambda m: m.t))


class Workspace:
    """Fresh run and private folders under one temporary folder, removed at the end."""

    def __init__(self, keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench_clients_"))
        self.keep = keep
        self.n = 0

    def next(self, name: str) -> tuple[Path, Path]:
        self.n += 1
        return self.root / f"{self.n:02d}-{name}", self.root / f"{self.n:02d}-{name}-private"

    def close(self) -> None:
        if self.keep:
            print(f"(kept {self.root})")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def cpu_usage_children() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_run(ws: Workspace, name: str, n_ranks: int, sets: list[str],
              args: argparse.Namespace) -> RunRecord:
    out, private = ws.next(name)
    cpu0 = cpu_usage_children()
    rec = run_alignfl(n_ranks, sets, out_dir=out, private_dir=private,
                      data_root=args.data_root, timeout=args.timeout, verbose=args.verbose,
                      sample_s=getattr(args, "sample_s", 0.5),
                      launcher_flags=tuple(getattr(args, "mpiexec_flag", ())))
    rec.children_cpu_s = cpu_usage_children() - cpu0
    return rec


# --- the floor: plain PyTorch processes, no runtime -------------------------------------
def _floor_worker(index: int, share: list[int], path: str, sets: list[str], rounds: int,
                  barrier: Any, queue: Any) -> None:
    torch.set_num_threads(1)
    cfg = load_config(preset="paper", overrides=sets)
    cpu = torch.device("cpu")
    clients = []
    for cid in share:
        part = read_client(path, cid)
        data = images_to_tensor(part.images)
        clients.append((new_local_state(cid, cfg.client_config(cid), seed=cfg.seed, device=cpu),
                        data))
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    train = [0.0, 0.0]  # wall, cpu
    prior = [0.0, 0.0]
    losses: dict[int, float] = {}
    for r in range(rounds):
        for state, data in clients:
            a, ac = time.perf_counter(), time.process_time()
            rs, generator = begin_round(state, seed=cfg.seed, round_=r)
            posterior: list | None = [] if state.cfg.prior_fit_on == "z" else None
            metrics = train_vae(state, data, generator=generator, posterior=posterior)
            b, bc = time.perf_counter(), time.process_time()
            fit_prior(state, data, seed=rs, posterior=posterior)
            state.rounds_done = r + 1
            c, cc = time.perf_counter(), time.process_time()
            train[0] += b - a
            train[1] += bc - ac
            prior[0] += c - b
            prior[1] += cc - bc
            losses[state.client_id] = float(metrics["loss"])
    queue.put({"index": index, "wall": time.perf_counter() - t0,
               "cpu": time.process_time() - c0, "train_wall": train[0], "train_cpu": train[1],
               "prior_wall": prior[0], "prior_cpu": prior[1], "losses": losses})


@dataclass
class Floor:
    wall_s: float  # the slowest process, shared start to its end
    cpu_s: float  # summed over the processes
    train_cpu_s: float
    prior_cpu_s: float
    per_proc: list[dict[str, Any]]
    load: tuple[float, float]

    @property
    def losses(self) -> dict[int, float]:
        return {c: v for p in self.per_proc for c, v in p["losses"].items()}


def run_floor(path: Path, sets: list[str], *, n_procs: int, rounds: int,
              timeout: float) -> Floor:
    """The same clients' local training in ``n_procs`` plain processes (spawned, no MPI)."""
    shares = place_clients(client_sizes(path), n_ranks=n_procs)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_procs)
    queue = ctx.Queue()
    before = os.getloadavg()[0]
    procs = [ctx.Process(target=_floor_worker, args=(i, shares[i], str(path), sets, rounds,
                                                     barrier, queue))
             for i in range(n_procs)]
    for p in procs:
        p.start()
    out = []
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            out.append(queue.get(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    out.sort(key=lambda d: d["index"])
    return Floor(wall_s=max(d["wall"] for d in out), cpu_s=sum(d["cpu"] for d in out),
                 train_cpu_s=sum(d["train_cpu"] for d in out),
                 prior_cpu_s=sum(d["prior_cpu"] for d in out), per_proc=out,
                 load=(before, os.getloadavg()[0]))


def same_training(floor: Floor, rec: RunRecord) -> bool:
    """Whether every client's last-round loss in the run equals the floor's bit for bit."""
    ok = True
    for cid, loss in floor.losses.items():
        run_loss = rec.results.clients[cid]["loss"][-1]
        if not np.float64(run_loss) == np.float64(loss):
            print(f"  client {cid}: floor loss {loss!r} != run loss {run_loss!r}")
            ok = False
    return ok


# --- modes --------------------------------------------------------------------------------
def efficiency_row(floor: Floor, rec: RunRecord, **extra: Any) -> dict[str, Any]:
    """One run against the floor: wall and CPU times, efficiencies."""
    client_ranks = list(range(1, rec.n_ranks))
    t = rec.results.timings
    row = {**extra, "floor_wall": floor.wall_s, "floor_cpu": floor.cpu_s,
           "floor_train_cpu": floor.train_cpu_s, "floor_prior_cpu": floor.prior_cpu_s,
           "floor_proc_wall": [p["wall"] for p in floor.per_proc],
           "collect": rec.collect_s, "collect_rounds": [float(x) for x in t["collect"]],
           "client_training": float(np.sum(t["client_training"])),
           "server_phase": float(sum(np.sum(t[k]) for k in ("sampling", "server_training",
                                                             "evaluation", "io"))),
           "client_cpu": rec.collect_cpu(client_ranks), "server_cpu": rec.collect_cpu([0]),
           "client_cpu_rounds": rec.window_cpu(client_ranks),
           "server_cpu_rounds": rec.window_cpu([0]),
           "rounds_wall": rec.rounds_wall_s, "run_wall": rec.wall_s,
           "run_all_cpu": rec.children_cpu_s, "load_floor": floor.load, "load_run": rec.load,
           "same_training": same_training(floor, rec)}
    row["eff_wall"] = row["floor_wall"] / row["collect"]
    row["eff_cpu"] = row["floor_cpu"] / row["client_cpu"]
    row["eff_cpu_all"] = row["floor_cpu"] / (row["client_cpu"] + row["server_cpu"])
    print(f"      run {extra.get('variant') or '(as configured)'}: collect {rec.collect_s:.2f} s "
          f"wall (per round {', '.join(f'{x:.2f}' for x in row['collect_rounds'])}); in the "
          f"collect phases client ranks {row['client_cpu']:.2f} cpu s, server "
          f"{row['server_cpu']:.2f} cpu s; ready to last round line: client ranks "
          f"{row['client_cpu_rounds']:.2f}, server {row['server_cpu_rounds']:.2f} cpu s, "
          f"server phases {row['server_phase']:.2f} s wall; job {rec.wall_s:.1f} s wall, "
          f"{rec.children_cpu_s:.1f} cpu s (load {rec.load[0]:.1f}->{rec.load[1]:.1f})",
          flush=True)
    print(f"      efficiency {row['eff_wall']:.3f} (wall), {row['eff_cpu']:.3f} (cpu, client "
          f"ranks), {row['eff_cpu_all']:.3f} (cpu, client ranks + server); same training as "
          f"the floor: {row['same_training']}", flush=True)
    return row


def mode_efficiency(args: argparse.Namespace, ws: Workspace) -> list[dict[str, Any]]:
    rows = []
    for n in args.clients:
        sets = overrides(n, scheme=args.scheme, rounds=args.rounds,
                         local_epochs=args.local_epochs, extra=tuple(args.set))
        path = ensure_partition(sets, args.data_root)
        sizes = client_sizes(path)
        per_rank = [sum(sizes[c] for c in s)
                    for s in place_clients(sizes, n_ranks=args.ranks - 1)]
        print(f"\n== {n} clients ({args.scheme}), {args.ranks} ranks, {args.rounds} rounds, "
              f"{args.local_epochs} local epoch(s): {sum(sizes)} samples, per client rank "
              f"{per_rank}", flush=True)
        variants = [("", [])] + ([(" ".join(args.also), list(args.also))] if args.also else [])
        for rep in range(args.repeats):
            floor = run_floor(path, [*sets, f'data.data_root="{args.data_root}"'],
                              n_procs=args.floor_procs, rounds=args.rounds,
                              timeout=args.timeout)
            walls = ", ".join(f"{p['wall']:.2f}" for p in floor.per_proc)
            print(f"  [{rep}] floor {floor.wall_s:.2f} s wall, {floor.cpu_s:.2f} cpu s (train "
                  f"{floor.train_cpu_s:.2f}, prior {floor.prior_cpu_s:.2f}; per process "
                  f"{walls} s; load {floor.load[0]:.1f}->{floor.load[1]:.1f})", flush=True)
            for name, extra in variants:
                rec = timed_run(ws, f"eff{n}", args.ranks, [*sets, *extra], args)
                rows.append(efficiency_row(floor, rec, clients=n, repeat=rep, variant=name))
    print("\n| clients | run | floor (wall s) | client phase (wall s) | efficiency (wall) | "
          "floor (cpu s) | client ranks (cpu s) | server (cpu s) | efficiency (cpu) | "
          "efficiency (cpu, with server) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['clients']} | {row['variant'] or 'as configured'} | "
              f"{row['floor_wall']:.2f} | {row['collect']:.2f} | {row['eff_wall']:.3f} | "
              f"{row['floor_cpu']:.2f} | {row['client_cpu']:.2f} | {row['server_cpu']:.2f} | "
              f"{row['eff_cpu']:.3f} | {row['eff_cpu_all']:.3f} |")
    for n in args.clients:
        mine = [r for r in rows if r["clients"] == n and not r["variant"]]
        if len(mine) > 1:
            wall = statistics.median(r["eff_wall"] for r in mine)
            cpu = statistics.median(r["eff_cpu"] for r in mine)
            print(f"{n} clients: median efficiency {wall:.3f} (wall), {cpu:.3f} (cpu)")
    return rows


def scaling_row(rec: RunRecord, **extra: Any) -> dict[str, Any]:
    client_ranks = list(range(1, rec.n_ranks))
    return {**extra, "ranks": rec.n_ranks, "client_ranks": rec.n_ranks - 1,
            "collect": rec.collect_s,
            "collect_rounds": [float(x) for x in rec.results.timings["collect"]],
            "client_cpu": rec.collect_cpu(client_ranks), "server_cpu": rec.collect_cpu([0]),
            "rounds_wall": rec.rounds_wall_s, "run_wall": rec.wall_s,
            "load": rec.load}


# --- checkpoint cost ----------------------------------------------------------------------
WRITERS: dict[str, Any] = {
    # how clients checkpointed before: the whole state, torch.save
    "torch.save, state_dict": lambda path, state: save_checkpoint(path, state.state_dict()),
    # the raw format alone
    "raw, state_dict": lambda path, state: save_raw_checkpoint(path, state.state_dict()),
    # what ClientLoop writes now: less Adam's moments when fresh_optimizer clears them
    "raw, checkpoint_state": lambda path, state: save_raw_checkpoint(
        path, state.checkpoint_state()),
}


def _checkpoint_worker(writer: str, n_clients: int, rounds: int, folder: str,
                       queue: Any) -> None:
    """Checkpoint ``n_clients`` states once per round as ``ClientLoop._save_checkpoint``
    does (the last two kept); per round the mean CPU and wall ms per checkpoint."""
    torch.set_num_threads(1)
    cfg = load_config(preset="paper")
    states = []
    for cid in range(n_clients):
        state = new_local_state(cid, cfg.client_config(cid), seed=0, device=torch.device("cpu"))
        x = torch.rand(64, 1, 28, 28)
        recon, mu, _ = state.vae(x)
        (recon.sum() + mu.sum()).backward()
        state.optimizer.step()  # the Adam state exists, as after a local round
        states.append(state)
    save = WRITERS[writer]
    out = []
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for state in states:
            own = Path(folder) / f"client_{state.client_id}"
            save(own / f"round_{r + 1:04d}.ckpt", state)
            for old in sorted(own.glob("round_*.ckpt"))[:-2]:
                old.unlink()
        out.append({"cpu_ms": (time.process_time() - c0) / n_clients * 1e3,
                    "wall_ms": (time.perf_counter() - t0) / n_clients * 1e3})
    size = (Path(folder) / "client_0" / f"round_{rounds:04d}.ckpt").stat().st_size
    queue.put({"rounds": out, "mb": size / 1e6})


def _touch_worker(mb: int, queue: Any) -> None:
    """CPU ms per MB to fill ``mb`` MB of fresh memory, then the same again after a free."""
    out = []
    for _ in range(2):
        c0 = time.process_time()
        block = np.ones(mb * 2**20 // 8)
        out.append((time.process_time() - c0) * 1e3 / mb)
        del block
    queue.put(out)


def _in_process(target: Any, args: tuple[Any, ...], timeout: float) -> Any:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def mode_checkpoint(args: argparse.Namespace, ws: Workspace) -> list[dict[str, Any]]:
    rows = []
    for rep in range(args.repeats):
        for writer in WRITERS:
            folder, _ = ws.next("ckpt-" + writer.replace(", ", "-").replace(".", ""))
            res = _in_process(_checkpoint_worker, (writer, args.ckpt_clients, args.ckpt_rounds,
                                                   str(folder)), args.timeout)
            shutil.rmtree(folder, ignore_errors=True)
            for r, cost in enumerate(res["rounds"]):
                rows.append({"writer": writer, "repeat": rep, "round": r + 1, "mb": res["mb"],
                             **cost})
            print(f"  [{rep}] {writer}: {res['mb']:.1f} MB per checkpoint; per round "
                  + ", ".join(f"{c['cpu_ms']:.1f}" for c in res["rounds"])
                  + " ms cpu per checkpoint", flush=True)
    touch = _in_process(_touch_worker, (512,), args.timeout)
    print(f"\nCheckpoint cost: {args.ckpt_clients} client states, {args.ckpt_rounds} rounds, "
          "one checkpoint per client and round, the last two kept\n")
    print("| writer | MB | round | cpu ms per checkpoint | wall ms per checkpoint |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for writer in WRITERS:
        for r in range(1, args.ckpt_rounds + 1):
            mine = [x for x in rows if x["writer"] == writer and x["round"] == r]
            print(f"| {writer} | {mine[0]['mb']:.1f} | {r} | "
                  f"{statistics.median(x['cpu_ms'] for x in mine):.1f} | "
                  f"{statistics.median(x['wall_ms'] for x in mine):.1f} |")
    print(f"\nFilling 512 MB of fresh memory: {touch[0]:.2f} cpu ms per MB; the same again "
          f"after freeing it: {touch[1]:.2f} cpu ms per MB")
    rows.append({"touch_ms_per_mb": touch})
    return rows


def mode_strong(args: argparse.Namespace, ws: Workspace) -> list[dict[str, Any]]:
    n = args.strong_clients
    sets = overrides(n, scheme=args.scheme, rounds=args.rounds, local_epochs=args.local_epochs,
                     extra=tuple(args.set))
    ensure_partition(sets, args.data_root)
    rows = []
    for ranks in args.ranks_list:
        rec = timed_run(ws, f"strong{ranks}", ranks, sets, args)
        rows.append(scaling_row(rec, clients=n))
        print(f"  {ranks} ranks: collect {rec.collect_s:.2f} s wall, client ranks "
              f"{rows[-1]['client_cpu']:.2f} cpu s (load {rec.load[0]:.1f}->{rec.load[1]:.1f})",
              flush=True)
    base = rows[0]
    print(f"\nStrong scaling: {n} clients ({args.scheme}), {args.rounds} rounds, "
          f"{args.local_epochs} local epoch(s)\n")
    print("| client ranks | client phase (wall s) | speed-up | parallel efficiency | "
          "client ranks (cpu s) | rounds (wall s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        speed = base["collect"] / row["collect"]
        row["speedup"] = speed
        row["efficiency"] = speed * base["client_ranks"] / row["client_ranks"]
        print(f"| {row['client_ranks']} | {row['collect']:.2f} | {speed:.2f} | "
              f"{row['efficiency']:.2f} | {row['client_cpu']:.2f} | {row['rounds_wall']:.2f} |")
    return rows


def mode_weak(args: argparse.Namespace, ws: Workspace) -> list[dict[str, Any]]:
    rows = []
    for k in args.client_ranks:
        n = args.clients_per_rank * k
        epochs = args.local_epochs * k
        sets = overrides(n, scheme="iid", rounds=args.rounds, local_epochs=epochs,
                         extra=tuple(args.set))
        ensure_partition(sets, args.data_root)
        rec = timed_run(ws, f"weak{k}", k + 1, sets, args)
        rows.append(scaling_row(rec, clients=n, local_epochs=epochs))
        print(f"  {k} client rank(s), {n} clients, {epochs} epoch(s): collect "
              f"{rec.collect_s:.2f} s wall, client ranks {rows[-1]['client_cpu']:.2f} cpu s "
              f"(load {rec.load[0]:.1f}->{rec.load[1]:.1f})", flush=True)
    base = rows[0]
    print(f"\nWeak scaling: {args.clients_per_rank} clients per client rank (iid), "
          f"{args.rounds} rounds, local epochs x client ranks\n")
    print("| client ranks | clients | local epochs | client phase (wall s) | weak efficiency | "
          "client ranks (cpu s) | cpu per client rank (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        row["efficiency"] = base["collect"] / row["collect"]
        print(f"| {row['client_ranks']} | {row['clients']} | {row['local_epochs']} | "
              f"{row['collect']:.2f} | {row['efficiency']:.2f} | {row['client_cpu']:.2f} | "
              f"{row['client_cpu'] / row['client_ranks']:.2f} |")
    return rows


def plot(strong: list[dict[str, Any]], weak: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))

    def panel(ax: Any, rows: list[dict[str, Any]], title: str) -> list[int]:
        """Client phase and CPU per rank against the client ranks; returns the x values."""
        x = [r["client_ranks"] for r in rows]
        ax.plot(x, [r["collect"] for r in rows], "o-", label="client phase (wall)")
        ax.plot(x, [r["client_cpu"] / r["client_ranks"] for r in rows], "s--",
                label="client CPU per rank")
        ax.set_title(title)
        ax.set_xlabel("client ranks")
        ax.set_xticks(x)
        return x

    if strong:
        x = panel(axes[0], strong, f"strong scaling: {strong[0]['clients']} clients")
        axes[0].plot(x, [strong[0]["collect"] * x[0] / k for k in x], ":", color="grey",
                     label="ideal")
        axes[0].set_ylabel("seconds (all rounds)")
        axes[0].legend(fontsize=8)
    if weak:
        panel(axes[1], weak, f"weak scaling: {weak[0]['clients'] // weak[0]['client_ranks']} "
                             "clients per rank")
        axes[1].axhline(weak[0]["collect"], ls=":", color="grey", label="ideal")
        axes[1].set_ylim(bottom=0)
        axes[1].legend(fontsize=8)
    fig.suptitle("2-core shared VM, CPU, OMP_NUM_THREADS=1", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modes", nargs="+",
                        choices=["efficiency", "strong", "weak", "checkpoint"])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 100],
                        help="efficiency: client counts")
    parser.add_argument("--strong-clients", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=3, help="efficiency: world size")
    parser.add_argument("--ranks-list", type=int, nargs="+", default=[2, 3],
                        help="strong: world sizes")
    parser.add_argument("--clients-per-rank", type=int, default=10)
    parser.add_argument("--client-ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--floor-procs", type=int, default=2)
    parser.add_argument("--ckpt-clients", type=int, default=50,
                        help="checkpoint: client states (one rank's share of 100)")
    parser.add_argument("--ckpt-rounds", type=int, default=3)
    parser.add_argument("--scheme", default="dirichlet")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--sample-s", type=float, default=0.5,
                        help="how often the ranks' CPU time is read from /proc")
    parser.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                        help="efficiency: one more run per client count with this --set "
                             "(repeatable: all in that run), e.g. output.checkpoint=false")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more setting for every run of every mode (repeatable), "
                             "e.g. 'client.device=\"cuda\"'")
    parser.add_argument("--mpiexec-flag", action="append", default=[], metavar="FLAG",
                        help="a flag for mpiexec (repeatable), e.g. --mpiexec-flag=--oversubscribe")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--verbose", action="store_true", help="echo the runs' stderr")
    args = parser.parse_args(argv)
    args.data_root = args.data_root.resolve()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {os.cpu_count()} cores | load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} | OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')} | torch {torch.__version__}", flush=True)
    ws = Workspace(keep=args.keep)
    out: dict[str, Any] = {}
    try:
        if "efficiency" in args.modes:
            out["efficiency"] = mode_efficiency(args, ws)
        if "strong" in args.modes:
            out["strong"] = mode_strong(args, ws)
        if "weak" in args.modes:
            out["weak"] = mode_weak(args, ws)
        if "checkpoint" in args.modes:
            out["checkpoint"] = mode_checkpoint(args, ws)
    finally:
        ws.close()
    if args.plot and ("strong" in out or "weak" in out):
        plot(out.get("strong", []), out.get("weak", []), args.plot)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
