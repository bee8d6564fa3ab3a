"""The GPU scaling check: strong and weak scaling with the clients on CUDA, the GPU's
utilisation and memory during those runs, and the server's round against the number of
stored decoders on CUDA. Prepared for a lent machine with one GPU (all ranks share it);
run by hand, not in the tests.

On the GPU machine (one script, about 7 minutes; everything lands in ``--out``; the
device tool's exact command and carry list are in docs/GPU.md, "Prepared GPU scaling
check"):

    OMP_NUM_THREADS=1 python3 benchmarks/bench_gpu.py --out $OUT --budget-s 400

Here, on the CPU, the same logic at toy sizes (synthetic data, under a minute on 2 cores):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke

The tables and the plot for docs/PERFORMANCE.md, from the JSON that came back:

    .venv/bin/python benchmarks/bench_gpu.py --render bench_gpu.json \\
        --plot docs/figures/gpu_scaling.png

**What runs**, in this order, each part under its own timeout (``--pool-timeout``,
``--run-timeout``) and all of it under ``--budget-s`` (a part that no longer fits, less
than ``--min-part-s`` left, is skipped and recorded as such; after a weak run fails, the
larger weak runs are skipped):

1. ``pool``: ``benchmarks/bench_server_pool.py --device cuda`` in a subprocess: sampling
   plus global training per round against 10, 100 and 1000 stored decoders at a fixed
   pool (``--pool-size``).
2. ``strong``: ``--strong-clients`` (100) clients (``--scheme``, Dirichlet) on each of
   ``--strong-ranks`` (1 2 4 8 15) client ranks; ``weak``: ``--clients-per-rank`` (125)
   clients on each of ``--weak-ranks`` (1 2 4 8) client ranks (``iid``; local epochs x
   client ranks, as ``bench_clients.py weak`` does), up to 1000 clients. The runs
   interleave (strong 1, weak 1, strong 2, ...), so a budget cut short leaves both
   curves' small points. Each run is ``bench_clients.run_alignfl`` (``mpiexec``, the
   ``paper`` preset, 1 local epoch, ``server.epochs = 1``, ``server.pool_size = 2000``,
   no quality metrics or PNGs) with ``client.device`` and ``server.device`` set to
   ``--device`` and, unless ``--checkpoints``, ``output.checkpoint = false`` (1000
   clients would write 4.5 GB per round).

Throughout, a background thread reads ``nvidia-smi --query-gpu=utilization.gpu,
memory.used`` and ``--query-compute-apps=pid,used_memory`` every ``--sample-s`` seconds;
each run reports the mean and peak utilisation (whole run and inside its collect phases),
the peak memory in use, and the peak per process, told apart by MPI rank. Without
``nvidia-smi`` (the CPU smoke run) these are ``null``: missing, not zero.

**Data**: ``--data auto`` uses MNIST (and Fashion-MNIST outliers) from ``--data-root``
when present, MNIST without outliers when Fashion-MNIST is missing, else a synthetic
partition of random images (``synthetic``: timing only; the JSON and tables say so).
``--smoke`` means ``--device cpu``, synthetic data and toy sizes.

Output: ``bench_gpu.json`` (rewritten after every part, so a run killed on its way still
leaves what it measured), ``bench_gpu.log``, ``bench_gpu.md`` (the tables) and
``gpu_scaling.png``. SIGTERM (``timeout``) kills the job in flight and saves the JSON.
Open MPI is given ``--oversubscribe`` (and ``--allow-run-as-root`` as root); MPICH needs
neither (``--mpiexec-flag`` overrides the detection).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_clients as bc  # noqa: E402

REPO = bc.REPO
SCHEMA = "bench_gpu/1"
JSON_NAME, LOG_NAME, MD_NAME, PNG_NAME = ("bench_gpu.json", "bench_gpu.log", "bench_gpu.md",
                                          "gpu_scaling.png")
MIB = 2**20


# --- sampling the GPU -------------------------------------------------------------------
def parse_number(text: str) -> float | None:
    """A number of ``nvidia-smi``'s CSV, or None for ``[N/A]`` and the like.

    >>> parse_number(" 37 "), parse_number("[N/A]")
    (37.0, None)
    """
    try:
        return float(text.strip())
    except ValueError:
        return None


def parse_gpu_query(text: str) -> tuple[float | None, float | None]:
    """``(utilisation %, memory used MiB)`` of the first GPU from ``--query-gpu=
    utilization.gpu,memory.used --format=csv,noheader,nounits``.

    >>> parse_gpu_query("37, 1234\\n5, 10\\n")
    (37.0, 1234.0)
    >>> parse_gpu_query("")
    (None, None)
    """
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 2:
            return parse_number(fields[0]), parse_number(fields[1])
    return None, None


def parse_compute_apps(text: str) -> dict[int, float | None]:
    """``{pid: used MiB}`` from ``--query-compute-apps=pid,used_memory
    --format=csv,noheader,nounits`` (a line that is no ``pid, number`` is skipped).

    >>> parse_compute_apps("101, 500\\n102, [N/A]\\nNo running processes found\\n")
    {101: 500.0, 102: None}
    """
    out: dict[int, float | None] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 2 and fields[0].strip().isdigit():
            out[int(fields[0])] = parse_number(fields[1])
    return out


def mpi_rank_of(pid: int) -> int | None:
    """The MPI rank of a running process (from its environment), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for var in bc.RANK_VARS:
        for entry in env:
            if entry.startswith(var):
                return int(entry[len(var):])
    return None


@dataclass(frozen=True)
class GpuSample:
    """One reading: ``time.monotonic()``, utilisation %, memory used MiB, and per process
    ``{pid: used MiB}`` (None where that query failed)."""

    t: float
    util: float | None
    mem_mib: float | None
    apps: dict[int, float | None] | None


class GpuSampler:
    """Reads ``nvidia-smi`` every ``interval_s`` seconds in a background thread.

    ``available`` is False when the command is not found; then nothing is sampled and
    every statistic is None (missing). The MPI rank of each process seen is looked up
    once, while it runs.
    """

    def __init__(self, *, interval_s: float, command: str = "nvidia-smi") -> None:
        self.interval_s = interval_s
        self.path = shutil.which(command)
        self.samples: list[GpuSample] = []
        self.ranks: dict[int, int | None] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.path is not None

    def start(self) -> None:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.samples.append(self.read())
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def _query(self, *args: str) -> str | None:
        assert self.path is not None
        try:
            proc = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._note(f"{args[0]}: {exc}")
            return None
        if proc.returncode != 0:
            self._note(f"{args[0]}: exit {proc.returncode}: {proc.stderr.strip()[:200]}")
            return None
        return proc.stdout

    def _note(self, error: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(error)

    def read(self) -> GpuSample:
        t = time.monotonic()
        gpu = self._query("--query-gpu=utilization.gpu,memory.used",
                          "--format=csv,noheader,nounits")
        apps_text = self._query("--query-compute-apps=pid,used_memory",
                                "--format=csv,noheader,nounits")
        apps = parse_compute_apps(apps_text) if apps_text is not None else None
        for pid in apps or {}:
            if pid not in self.ranks:
                self.ranks[pid] = mpi_rank_of(pid)
        util, mem = parse_gpu_query(gpu) if gpu is not None else (None, None)
        return GpuSample(t=t, util=util, mem_mib=mem, apps=apps)

    def stats(self, windows: list[tuple[float, float]]) -> dict[str, Any] | None:
        """:func:`window_stats` of the samples so far; None when nothing can be sampled."""
        if not self.available:
            return None
        return window_stats(list(self.samples), windows, ranks=self.ranks)


def _peak(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def window_stats(samples: list[GpuSample], windows: list[tuple[float, float]], *,
                 ranks: dict[int, int | None] | None = None) -> dict[str, Any]:
    """Utilisation and memory over the samples inside any of ``windows`` (monotonic s).

    ``util_mean``/``util_peak`` in %, ``mem_peak_mib`` the GPU's memory in use,
    ``procs_peak`` the most compute processes at once, ``proc_mem_sum_peak_mib`` their
    largest total, ``rank_mem_peak_mib`` each MPI rank's peak (where its rank is known).
    A value no sample had is None.

    >>> s = [GpuSample(1.0, 50.0, 900.0, {7: 400.0}),
    ...      GpuSample(2.0, 100.0, 1000.0, {7: 500.0, 8: 300.0}), GpuSample(9.0, 0.0, 100.0, {})]
    >>> w = window_stats(s, [(0.5, 2.5)], ranks={7: 0, 8: 1})
    >>> w["util_mean"], w["util_peak"], w["mem_peak_mib"], w["procs_peak"]
    (75.0, 100.0, 1000.0, 2)
    >>> w["proc_mem_sum_peak_mib"], w["rank_mem_peak_mib"]
    (800.0, {'0': 500.0, '1': 300.0})
    """
    ranks = ranks or {}
    inside = [s for s in samples if any(a <= s.t <= b for a, b in windows)]
    utils = [s.util for s in inside if s.util is not None]
    with_apps = [s.apps for s in inside if s.apps is not None]
    per_rank: dict[str, float] = {}
    for apps in with_apps:
        for pid, mem in apps.items():
            rank = ranks.get(pid)
            if rank is not None and mem is not None:
                key = str(rank)
                per_rank[key] = max(per_rank.get(key, 0.0), mem)
    return {
        "samples": len(inside),
        "util_mean": statistics.fmean(utils) if utils else None,
        "util_peak": max(utils) if utils else None,
        "mem_peak_mib": _peak([s.mem_mib for s in inside]),
        "procs_peak": max((len(a) for a in with_apps), default=None),
        "proc_mem_sum_peak_mib": _peak([sum(v for v in a.values() if v is not None)
                                        if any(v is not None for v in a.values()) else None
                                        for a in with_apps]),
        "rank_mem_peak_mib": dict(sorted(per_rank.items(), key=lambda kv: int(kv[0])))
                             if per_rank else None,
    }


# --- the plan -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One scaling run: its series, client ranks (world size - 1), clients, epochs."""

    series: str
    client_ranks: int
    clients: int
    local_epochs: int
    scheme: str

    @property
    def name(self) -> str:
        return f"{self.series}{self.client_ranks}"


def plan_jobs(*, strong_clients: int, strong_ranks: list[int], clients_per_rank: int,
              weak_ranks: list[int], scheme: str, local_epochs: int = 1) -> list[Job]:
    """The scaling runs in the order they run: strong and weak interleaved, each series in
    the order given, so a budget cut short leaves the small points of both.

    >>> [j.name for j in plan_jobs(strong_clients=100, strong_ranks=[1, 2, 4],
    ...                            clients_per_rank=10, weak_ranks=[1, 2], scheme="iid")]
    ['strong1', 'weak1', 'strong2', 'weak2', 'strong4']
    >>> plan_jobs(strong_clients=100, strong_ranks=[], clients_per_rank=10, weak_ranks=[4],
    ...           scheme="iid")[0]
    Job(series='weak', client_ranks=4, clients=40, local_epochs=4, scheme='iid')
    """
    strong = [Job("strong", k, strong_clients, local_epochs, scheme) for k in strong_ranks]
    weak = [Job("weak", k, clients_per_rank * k, local_epochs * k, "iid") for k in weak_ranks]
    out = []
    for i in range(max(len(strong), len(weak))):
        out += [s[i] for s in (strong, weak) if i < len(s)]
    return out


def launcher_flags(version_text: str, *, euid: int) -> list[str]:
    """``mpiexec`` flags: Open MPI needs ``--oversubscribe`` (and ``--allow-run-as-root``
    as root); MPICH needs none.

    >>> launcher_flags("mpiexec (OpenRTE) 4.1.6", euid=0)
    ['--oversubscribe', '--allow-run-as-root']
    >>> launcher_flags("HYDRA build details: Version: 4.2.0", euid=0)
    []
    """
    if "Open MPI" not in version_text and "OpenRTE" not in version_text:
        return []
    return ["--oversubscribe"] + (["--allow-run-as-root"] if euid == 0 else [])


def mpi_label(version_text: str | None) -> str | None:
    """One line naming the MPI launcher from its ``--version`` output.

    >>> mpi_label("mpiexec (OpenRTE) 4.1.6\\n\\nReport bugs to ...")
    'mpiexec (OpenRTE) 4.1.6'
    >>> mpi_label("HYDRA build details:\\n    Version:     5.0.2\\n    Release Date: ...")
    'MPICH Hydra 5.0.2'
    """
    if not version_text:
        return None
    lines = [line.strip() for line in version_text.splitlines() if line.strip()]
    if lines[0].startswith("HYDRA"):
        version = next((line.split(":", 1)[1].strip() for line in lines
                        if line.startswith("Version:")), "?")
        return f"MPICH Hydra {version}"
    return lines[0]


# --- data -----------------------------------------------------------------------------------
def choose_data(kind: str, root: Path) -> tuple[str, list[str]]:
    """``(data label, extra settings)`` for ``--data``: ``mnist`` (with the preset's
    Fashion-MNIST outliers when present), or ``synthetic``."""
    from alignfl_mpi.datasets import available

    have = available(root)
    if kind == "synthetic" or (kind == "auto" and not have.get("mnist")):
        return "synthetic", ["data.outliers=0"]
    if not have.get("mnist"):
        raise SystemExit(f"bench_gpu: --data mnist: no MNIST under {root} (carry data/mnist)")
    if have.get("fashion-mnist"):
        return "mnist", []
    return "mnist (no outliers: Fashion-MNIST missing)", ["data.outliers=0"]


def synthetic_partition(path: Path, *, n_clients: int, n_images: int, seed: int = 0) -> Path:
    """A partition of ``n_images`` random 28x28 images split evenly over ``n_clients``
    (a bright bar per label on low noise, as ``tests/test_mpi_runtime.tiny_partition``),
    with 1000 test images and no outliers. For timing only: nothing to learn."""
    from alignfl_mpi.schema import ClientData, write_partition

    if path.exists():
        return path
    rng = np.random.default_rng(seed)

    def images(labels: np.ndarray) -> np.ndarray:
        out = rng.integers(0, 30, size=(len(labels), 28, 28)).astype(np.uint8)
        for k in range(10):
            out[labels == k, 2 + 2 * k: 6 + 2 * k, 4:24] = 220
        return out

    per = max(1, n_images // n_clients)
    clients = []
    for cid in range(n_clients):
        labels = rng.integers(0, 10, per).astype(np.int64)
        clients.append(ClientData(client_id=cid, images=images(labels), labels=labels,
                                  outlier=np.zeros(per, bool),
                                  source_index=np.arange(cid * per, (cid + 1) * per,
                                                         dtype=np.int64)))
    test_labels = np.repeat(np.arange(10, dtype=np.int64), 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_partition(path, clients=clients, test_images=images(test_labels),
                           test_labels=test_labels,
                           outlier_test_images=np.zeros((0, 28, 28), np.uint8),
                           outlier_test_labels=np.zeros(0, np.int64),
                           attrs={"dataset": "synthetic", "outlier_dataset": "",
                                  "scheme": "synthetic", "scheme_params": {}, "seed": seed,
                                  "n_outliers": 0, "outlier_client": 0, "source_sha256": {},
                                  "created": "", "package_version": "bench_gpu"})


# --- the log and the JSON ---------------------------------------------------------------
@dataclass
class Report:
    """The JSON document and the log, both under ``out``; saved after every part."""

    out: Path
    doc: dict[str, Any] = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(message, flush=True)
        with open(self.out / LOG_NAME, "a") as f:
            f.write(message + "\n")

    def save(self) -> None:
        tmp = self.out / (JSON_NAME + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.out / JSON_NAME)


def _output(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip()
    return text if proc.returncode == 0 and text else None


def environment() -> dict[str, Any]:
    """The machine, its GPU, torch and the MPI launcher, as this script sees them."""
    cuda = torch.cuda.is_available()
    return {
        "host": platform.node(), "platform": platform.platform(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "load": os.getloadavg(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "nvidia_smi": _output(["nvidia-smi", "--query-gpu=name,driver_version,"
                                   "memory.total,compute_mode", "--format=csv,noheader"]),
        "mpiexec": bc.MPIEXEC or None,
        "mpiexec_version": mpi_label(_output([bc.MPIEXEC, "--version"]) if bc.MPIEXEC
                                     else None),
        "alignfl_cmd": bc.ALIGNFL_CMD,
        "git": _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# --- the parts ------------------------------------------------------------------------------
class Budget:
    """Seconds left before ``--budget-s`` runs out, and how long the next part may take."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, part_timeout: float) -> float:
        return max(0.0, min(part_timeout, self.left()))


def run_pool(args: argparse.Namespace, *, report: Report, sampler: GpuSampler,
             budget: Budget) -> dict[str, Any]:
    """``bench_server_pool.py --device DEVICE`` in a subprocess, under its own timeout."""
    limit = budget.limit(args.pool_timeout)
    if limit < args.min_part_s:
        return {"status": "skipped", "reason": f"{budget.left():.0f} s of budget left"}
    rows_file = Path(tempfile.mkdtemp(prefix="bench_gpu_pool_")) / "pool.json"
    cmd = [sys.executable, str(HERE / "bench_server_pool.py"), "--device", args.device,
           "--decoders", *map(str, args.pool_decoders), "--pool-size", str(args.pool_size),
           "--rounds", str(args.pool_rounds), "--epochs", "1", "--json", str(rows_file)]
    report.say(f"\n== server pool: {' '.join(cmd[1:])} (limit {limit:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            report.say("    | " + line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = "ok"
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = "timeout"
    reader.join(10)
    wall = time.monotonic() - t0
    if status == "ok" and proc.returncode != 0:
        status = "error"
    part: dict[str, Any] = {"status": status, "wall_s": wall, "command": cmd[1:],
                            "gpu": sampler.stats([(t0, t0 + wall)])}
    if rows_file.exists():
        part.update(json.loads(rows_file.read_text()))
    if status != "ok":
        part["error"] = "\n".join(lines[-30:])
    shutil.rmtree(rows_file.parent, ignore_errors=True)
    report.say(f"   server pool: {status}, {len(part.get('rows', []))} row(s), {wall:.1f} s")
    return part


def job_sets(job: Job, args: argparse.Namespace, *, data_sets: list[str],
             partition: Path | None) -> list[str]:
    """The run's ``--set`` values: bench_clients' common ones, the device, data, extras."""
    extra = [f'client.device="{args.device}"', f'server.device="{args.device}"', *data_sets]
    if not args.checkpoints:
        extra.append("output.checkpoint=false")
    if partition is not None:
        extra.append(f'data.partition="{partition}"')
    return bc.overrides(job.clients, scheme=job.scheme, rounds=args.rounds,
                        local_epochs=job.local_epochs, extra=(*extra, *args.set))


def run_job(job: Job, args: argparse.Namespace, *, report: Report, sampler: GpuSampler,
            budget: Budget, ws: bc.Workspace, data: str, data_sets: list[str]) -> dict[str, Any]:
    """One scaling run under ``mpiexec``: bench_clients' scaling row plus the GPU's."""
    row: dict[str, Any] = {**asdict(job), "name": job.name, "ranks": job.client_ranks + 1}
    if budget.left() < args.min_part_s:
        return {**row, "status": "skipped", "reason": f"{budget.left():.0f} s of budget left"}
    t0 = time.monotonic()
    partition = None
    if data == "synthetic":
        partition = synthetic_partition(ws.root / "partitions" / f"synthetic_c{job.clients}.h5",
                                        n_clients=job.clients, n_images=args.synthetic_images)
    sets = job_sets(job, args, data_sets=data_sets, partition=partition)
    if partition is None:
        bc.ensure_partition(sets, args.data_root)
    row["partition_s"] = time.monotonic() - t0
    limit = budget.limit(args.run_timeout)
    if limit < args.min_part_s:
        return {**row, "status": "skipped", "reason": f"{budget.left():.0f} s of budget left"}
    out, private = ws.next(job.name)
    report.say(f"\n== {job.name}: {job.clients} clients on {job.client_ranks} client rank(s), "
               f"{job.local_epochs} local epoch(s), {args.device} (limit {limit:.0f} s)")
    start = time.monotonic()
    try:
        rec = bc.run_alignfl(job.client_ranks + 1, sets, out_dir=out, private_dir=private,
                             data_root=args.data_root, timeout=limit, verbose=args.verbose,
                             sample_s=args.cpu_sample_s, launcher_flags=tuple(args.mpiexec_flag))
    except RuntimeError as exc:
        text = str(exc)
        status = "timeout" if text.startswith("timed out") else "error"
        report.say(f"   {job.name}: {status}\n" + text[-3000:])
        return {**row, "status": status, "error": text[-3000:],
                "gpu_run": sampler.stats([(start, time.monotonic())])}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    row.update(bc.scaling_row(rec, clients=job.clients, local_epochs=job.local_epochs))
    row["status"] = "ok"
    row["timings"] = {k: [float(x) for x in v] for k, v in rec.results.timings.items()}
    row["server_phase"] = float(sum(np.sum(rec.results.timings.get(k, 0.0))
                                    for k in ("sampling", "server_training", "evaluation", "io")))
    row["gpu_run"] = sampler.stats([(start, start + rec.wall_s)])
    row["gpu_collect"] = sampler.stats([(start + a, start + b)
                                        for a, b in rec.collect_windows()])
    gpu = row["gpu_collect"] or {}
    report.say(f"   {job.name}: collect {row['collect']:.2f} s (per round "
               f"{', '.join(f'{x:.2f}' for x in row['collect_rounds'])}), client ranks "
               f"{row['client_cpu']:.1f} cpu s, server phases {row['server_phase']:.2f} s, run "
               f"{rec.wall_s:.1f} s; GPU in collect: util mean {_fmt(gpu.get('util_mean'))} "
               f"%, peak memory {_fmt(gpu.get('mem_peak_mib'), '.0f')} MiB")
    return row


# --- rendering ------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".1f") -> str:
    """A number for the tables; ``n/a`` for a missing one.

    >>> _fmt(None), _fmt(3.14159, ".2f")
    ('n/a', '3.14')
    """
    return "n/a" if value is None else format(value, spec)


def _first(text: str | None) -> str:
    """The first line of an error message ('' if none)."""
    return (text or "").strip().split("\n", 1)[0]


def _gpu_cells(row: dict[str, Any]) -> list[str]:
    run, col = row.get("gpu_run") or {}, row.get("gpu_collect") or {}
    ranks = run.get("rank_mem_peak_mib") or {}
    clients = [v for k, v in ranks.items() if k != "0"]
    return [f"{_fmt(col.get('util_mean'), '.0f')} / {_fmt(run.get('util_peak'), '.0f')}",
            _fmt(run.get("mem_peak_mib"), ".0f"),
            f"{_fmt(ranks.get('0'), '.0f')} / {_fmt(max(clients) if clients else None, '.0f')}"]


def scaling_table(rows: list[dict[str, Any]], series: str) -> list[str]:
    """The markdown table of one series' finished runs, by client ranks (empty if none).

    Speed-up and efficiency are against the series' run on the fewest client ranks.
    """
    ok = sorted((r for r in rows if r["series"] == series and r.get("status") == "ok"),
                key=lambda r: r["client_ranks"])
    if not ok:
        return []
    base = ok[0]
    weak = series == "weak"
    head = ["client ranks", "clients", *(["local epochs"] if weak else []),
            "client phase (wall s)", "last round (wall s)",
            *(["weak efficiency"] if weak else ["speed-up", "parallel efficiency"]),
            "client ranks (cpu s)", "server phases (wall s)",
            "GPU util % (collect mean / run peak)", "GPU memory peak (MiB)",
            "per rank peak MiB (server / client max)", "run (wall s)"]
    lines = ["| " + " | ".join(head) + " |",
             "| " + " | ".join("---:" for _ in head) + " |"]
    for r in ok:
        speed = base["collect"] / r["collect"]
        scale = (["%.2f" % speed] if weak
                 else ["%.2f" % speed, "%.2f" % (speed * base["client_ranks"] / r["client_ranks"])])
        cells = [str(r["client_ranks"]), str(r["clients"]),
                 *([str(r["local_epochs"])] if weak else []),
                 f"{r['collect']:.2f}", f"{r['collect_rounds'][-1]:.2f}", *scale,
                 f"{r['client_cpu']:.1f}", f"{r['server_phase']:.2f}", *_gpu_cells(r),
                 f"{r['run_wall']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pool_table(part: dict[str, Any]) -> list[str]:
    """The server-pool rows as a markdown table (empty if none)."""
    rows = part.get("rows") or []
    if not rows:
        return []
    base = rows[0]["total"]
    lines = ["| decoders | registry MB | accept s | sample s | train s | total s | ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['decoders']} | {r['registry_bytes'] / 1e6:.1f} | "
                     f"{r['accept_s']:.1f} | {r['sample']:.3f} | {r['train']:.3f} | "
                     f"{r['total']:.3f} | {r['total'] / base:.2f} |")
    return lines


def render(doc: dict[str, Any]) -> str:
    """The markdown for docs/PERFORMANCE.md from a ``bench_gpu.json`` document."""
    env, cfg = doc.get("environment", {}), doc.get("config", {})
    runs = doc.get("runs", [])
    device = env.get("cuda_device") or env.get("nvidia_smi") or "no GPU"
    idle = (doc.get("gpu_idle") or {}).get("mem_peak_mib")
    scheme = ("synthetic, even split" if doc.get("data") == "synthetic"
              else cfg.get("scheme"))
    out = [f"**Machine:** {device}; {env.get('cpus')} cores, torch {env.get('torch')} "
           f"(CUDA {env.get('torch_cuda')}), {env.get('mpiexec_version') or 'no mpiexec'}, "
           f"`OMP_NUM_THREADS={env.get('omp_num_threads')}`. **Date:** {doc.get('started')} "
           f"({doc.get('mode')} mode, {doc.get('elapsed_s', 0):.0f} s in all).",
           "",
           f"Clients and server on `{cfg.get('device')}`; data: **{doc.get('data')}**; "
           f"{cfg.get('rounds')} round(s); checkpoints {'on' if cfg.get('checkpoints') else 'off'};"
           f" GPU sampled every {cfg.get('sample_s')} s"
           + (f" ({_fmt(idle, '.0f')} MiB in use before the runs)" if doc.get("gpu_sampled")
              else " (no nvidia-smi: GPU columns missing)") + "."]
    strong = scaling_table(runs, "strong")
    if strong:
        out += ["", f"Strong scaling: {cfg.get('strong_clients')} clients ({scheme}), "
                "1 local epoch", "", *strong]
    weak = scaling_table(runs, "weak")
    if weak:
        out += ["", f"Weak scaling: {cfg.get('clients_per_rank')} clients per client rank "
                f"({'synthetic, even split' if scheme != cfg.get('scheme') else 'iid'}), "
                "local epochs x client ranks", "", *weak]
    missing = [r for r in runs if r.get("status") != "ok"]
    if missing:
        out += ["", "Not measured: " + "; ".join(
            f"{r['name']} ({r.get('status')}: {r.get('reason') or _first(r.get('error'))})"
            for r in missing)]
    pool = doc.get("server_pool") or {}
    table = pool_table(pool)
    if table:
        cut = "" if pool.get("status") == "ok" else f" ({pool.get('status')}: rows so far)"
        gpu = pool.get("gpu") or {}
        out += ["", f"Server round against stored decoders on `{pool.get('device')}`: pool "
                f"{pool.get('pool_size')}, server.epochs {pool.get('epochs')}, median of "
                f"{pool.get('rounds')} rounds (wall s){cut}; GPU over the whole part: util "
                f"peak {_fmt(gpu.get('util_peak'), '.0f')} %, memory peak "
                f"{_fmt(gpu.get('mem_peak_mib'), '.0f')} MiB", "", *table]
    elif pool:
        out += ["", f"Server pool: {pool.get('status')} ({pool.get('reason', '')})"]
    return "\n".join(out) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Strong and weak scaling (client phase) and the GPU's utilisation, one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in doc.get("runs", []) if r.get("status") == "ok"]
    if not runs:
        return None
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, series in zip(axes[:2], ("strong", "weak")):
        rows = sorted((r for r in runs if r["series"] == series), key=lambda r: r["client_ranks"])
        ax.set_title(f"{series} scaling")
        ax.set_xlabel("client ranks")
        if not rows:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        x = [r["client_ranks"] for r in rows]
        ax.plot(x, [r["collect"] for r in rows], "o-", label="client phase (all rounds)")
        ax.plot(x, [r["collect_rounds"][-1] for r in rows], "s--", label="last round")
        base = rows[0]
        ideal = ([base["collect"] * x[0] / k for k in x] if series == "strong"
                 else [base["collect"]] * len(x))
        ax.plot(x, ideal, ":", color="grey", label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(k) for k in x])
        ax.set_ylim(bottom=0)
        ax.set_ylabel("wall s")
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.set_title("GPU during the collect phases")
    ax.set_xlabel("client ranks")
    ax.set_ylabel("utilisation % (mean)")
    drawn = False
    for series, marker in (("strong", "o-"), ("weak", "s-")):
        rows = sorted((r for r in runs if r["series"] == series
                       and (r.get("gpu_collect") or {}).get("util_mean") is not None),
                      key=lambda r: r["client_ranks"])
        if rows:
            drawn = True
            ax.plot([r["client_ranks"] for r in rows],
                    [r["gpu_collect"]["util_mean"] for r in rows], marker, label=series)
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no GPU samples", ha="center", transform=ax.transAxes)
    env = doc.get("environment", {})
    fig.suptitle(f"{env.get('cuda_device') or 'CPU'}, {env.get('cpus')} cores; data "
                 f"{doc.get('data')}", fontsize=9)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def stop_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGINT (e.g. ``timeout``): kill the runs this script started (they have
    sessions of their own), then leave through ``main``'s ``finally``, which saves the
    JSON with what was measured."""
    for pid in bc._descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(f"bench_gpu: stopped by signal {signum}; partial results saved")


# --- main -----------------------------------------------------------------------------------
SMOKE = {"device": "cpu", "data": "synthetic", "synthetic_images": 2400, "strong_clients": 6,
         "strong_ranks": [1, 2], "clients_per_rank": 3, "weak_ranks": [1, 2],
         "pool_decoders": [2, 5], "pool_size": 200, "pool_rounds": 1, "budget_s": 240.0,
         "run_timeout": 120.0, "pool_timeout": 120.0, "min_part_s": 10.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for the JSON, log, tables and plot")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, synthetic data, toy sizes: " + ", ".join(f"{k}={v}" for k, v
                                                                      in SMOKE.items()))
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="print the markdown tables of a bench_gpu.json, then stop")
    p.add_argument("--plot", type=Path, help="with --render: write the scaling plot here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--parts", nargs="+", default=["pool", "strong", "weak"],
                   choices=["pool", "strong", "weak"])
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="the whole check's seconds; a part that no longer fits is skipped")
    p.add_argument("--run-timeout", type=float, default=150.0, help="seconds per mpiexec run")
    p.add_argument("--pool-timeout", type=float, default=100.0)
    p.add_argument("--min-part-s", type=float, default=40.0,
                   help="skip a part when less than this is left of the budget")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scheme", default="dirichlet", help="strong scaling's partition scheme")
    p.add_argument("--strong-clients", type=int, default=100)
    p.add_argument("--strong-ranks", type=int, nargs="+", default=[1, 2, 4, 8, 15])
    p.add_argument("--clients-per-rank", type=int, default=125)
    p.add_argument("--weak-ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--pool-decoders", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--pool-size", type=int, default=5000)
    p.add_argument("--pool-rounds", type=int, default=3)
    p.add_argument("--data", default="auto", choices=["auto", "mnist", "synthetic"])
    p.add_argument("--data-root", type=Path, default=REPO / "data")
    p.add_argument("--synthetic-images", type=int, default=60000,
                   help="synthetic data: images over all clients (MNIST's 60000)")
    p.add_argument("--checkpoints", action="store_true",
                   help="keep output.checkpoint on (the preset's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more setting for every run (repeatable)")
    p.add_argument("--mpiexec-flag", action="append", default=None, metavar="FLAG",
                   help="flags for mpiexec (default: detected, see launcher_flags)")
    p.add_argument("--sample-s", type=float, default=0.3, help="nvidia-smi every this often")
    p.add_argument("--cpu-sample-s", type=float, default=0.5,
                   help="the ranks' CPU time read from /proc every this often")
    p.add_argument("--verbose", action="store_true", help="echo the runs' stderr")
    args = p.parse_args(argv)
    if args.render:
        if not args.render.is_file():
            p.error(f"--render {args.render}: no such file")
        return args
    if args.out is None:
        p.error("--out is required (or --render JSON)")
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    for name in ("rounds", "strong_clients", "clients_per_rank", "synthetic_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.strong_ranks + args.weak_ranks) < 1:
        p.error("--strong-ranks and --weak-ranks must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                "(use --smoke or --device cpu)")
    if not bc.MPIEXEC and ({"strong", "weak"} & set(args.parts)):
        p.error("no mpiexec next to this Python or on PATH")
    args.data_root = args.data_root.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        print(render(doc), end="")
        if args.plot:
            print(f"wrote {plot(doc, args.plot)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / LOG_NAME).unlink(missing_ok=True)
    report = Report(args.out)
    budget = Budget(args.budget_s)
    t_start = time.monotonic()
    env = environment()
    if args.mpiexec_flag is None:
        args.mpiexec_flag = launcher_flags(env["mpiexec_version"] or "", euid=os.geteuid())
    data, data_sets = choose_data(args.data, args.data_root)
    sampler = GpuSampler(interval_s=args.sample_s)
    jobs = plan_jobs(strong_clients=args.strong_clients,
                     strong_ranks=args.strong_ranks if "strong" in args.parts else [],
                     clients_per_rank=args.clients_per_rank,
                     weak_ranks=args.weak_ranks if "weak" in args.parts else [],
                     scheme=args.scheme)
    report.doc = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "finished": None, "mode": "smoke" if args.smoke else "full",
                  "argv": sys.argv[1:] if argv is None else argv,
                  "config": {k: (str(v) if isinstance(v, Path) else v)
                             for k, v in vars(args).items()},
                  "environment": env, "data": data,
                  "data_note": ("random images: timings only, no learning to compare"
                                if data == "synthetic" else "MNIST from the data root"),
                  "gpu_sampled": sampler.available, "plan": [j.name for j in jobs],
                  "server_pool": None, "runs": []}
    report.say(f"bench_gpu {report.doc['mode']}: {env['cuda_device'] or 'no CUDA'}, "
               f"{env['cpus']} cores, torch {env['torch']}, {env['mpiexec_version']}; "
               f"data {data}; plan {', '.join(report.doc['plan'])}; budget {args.budget_s:.0f} s;"
               f" mpiexec flags {args.mpiexec_flag}; nvidia-smi "
               f"{'every %.1f s' % args.sample_s if sampler.available else 'absent (missing)'}")
    report.save()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_on_signal)
    sampler.start()
    ws = bc.Workspace()
    failed_weak = False
    try:
        time.sleep(min(1.0, 3 * args.sample_s) if sampler.available else 0)
        report.doc["gpu_idle"] = sampler.stats([(t_start, time.monotonic())])
        if "pool" in args.parts:
            report.doc["server_pool"] = run_pool(args, report=report, sampler=sampler,
                                                 budget=budget)
            report.save()
        for job in jobs:
            if job.series == "weak" and failed_weak:
                row = {**asdict(job), "name": job.name, "status": "skipped",
                       "reason": "a smaller weak run did not finish"}
            else:
                row = run_job(job, args, report=report, sampler=sampler, budget=budget, ws=ws,
                              data=data, data_sets=data_sets)
            failed_weak |= job.series == "weak" and row["status"] in ("timeout", "error")
            report.doc["runs"].append(row)
            report.save()
    except SystemExit as exc:
        report.doc["stopped"] = str(exc)
        raise
    finally:
        sampler.stop()
        ws.close()
        report.doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        report.doc["elapsed_s"] = time.monotonic() - t_start
        report.doc["gpu_errors"] = sampler.errors
        report.save()
    markdown = render(report.doc)
    (args.out / MD_NAME).write_text(markdown)
    report.say("\n" + markdown)
    try:
        written = plot(report.doc, args.out / PNG_NAME)
        report.say(f"wrote {written or 'no plot (no run finished)'}")
    except Exception as exc:  # the plot is a convenience; the JSON is what counts
        report.say(f"plot failed: {type(exc).__name__}: {exc}")
    statuses = [r["status"] for r in report.doc["runs"]]
    report.say(f"done in {report.doc['elapsed_s']:.0f} s: runs {statuses.count('ok')} ok of "
               f"{len(statuses)}, server pool {(report.doc['server_pool'] or {}).get('status')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
