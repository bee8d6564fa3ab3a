"""The sbatch scripts under a real SLURM on this host: slurmctld and two slurmd (.ci/slurm.sh).

``.ci/run`` starts the cluster around ``make test`` and exports ``SLURM_CONF``. Run alone, these
tests start one themselves when they are root and SLURM is installed, and skip with one line
saying why otherwise (``ALIGNFL_SLURM_REQUIRED=1``, set by CI, turns that skip into a failure).
Every wait has a deadline, so a hang fails.

Four tiny runs (3 rounds each) are submitted together; the first three share one partition
of 2 clients and one config:

- ``single``: the single-node script, ``srun --mpi=pmi2``, uninterrupted: the reference;
- ``requeued``: the single-node script launched with ``mpiexec`` (MPICH's Hydra inside the
  allocation), ``scontrol requeue`` during round 2;
- ``preempted``: the multi-node script on the two emulated nodes, ``srun --mpi=pmi2``;
  SIGTERM to the batch shell during round 2 (the signal ``--signal=B:TERM@300`` sends), after
  which the script requeues itself;
- ``many``: the many-clients script, 4 clients (a partition of their own) on its 2 client
  ranks, half of them asked each round, a synthetic pool of 64 images in all.

The interrupted runs must resume after round 1 and end bit-for-bit equal to ``single``.
An opt-in fifth job, ``timer``, has SLURM's own ``--signal=B:TERM@55`` timer (with ``--time=1``)
fire on a stand-in program that sleeps: the script must requeue itself.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_mpi_runtime import tiny_partition, write_config

from alignfl_mpi.results import load

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / ".ci" / "slurm.sh"
SINGLE = REPO / "slurm" / "alignfl_single_node.sbatch"
MULTI = REPO / "slurm" / "alignfl_multi_node.sbatch"
MANY = REPO / "slurm" / "alignfl_many_clients.sbatch"
BINDING = Path(__file__).resolve().parent / "slurm" / "show_binding.sh"
SLEEP_ONCE = Path(__file__).resolve().parent / "slurm" / "sleep_once.sh"
VENV_BIN = Path(sys.executable).parent
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = float(os.environ.get("ALIGNFL_SLURM_TIMEOUT", 420))  # all three runs together
TINY = ["--ntasks=3", "--cpus-per-task=1", "--overcommit"]  # 3 ranks on a 2-core node
TWO_NODES = ["--nodes=2", *TINY]  # 2 ranks on ci1, 1 on ci2


# --- the cluster ---------------------------------------------------------------------------
@dataclass
class Cluster:
    env: dict[str, str]

    def cmd(self, *args: str, timeout: float = 30, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(args), env=dict(self.env, **(env or {})), text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (finished jobs stay listed for MinJobAge = 600 s)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def sbatch(self, script: Path, *opts: str, workdir: Path, name: str,
               env: dict[str, str]) -> "Job":
        out = workdir / f"{name}-%j.out"
        proc = self.cmd("sbatch", "--parsable", f"--chdir={workdir}", f"--output={out}",
                        f"--job-name={name}", *opts, str(script), env=env)
        job_id = int(proc.stdout.strip().split(";")[0])
        return Job(self, job_id, Path(str(out).replace("%j", str(job_id))))

    def has_gpus(self) -> bool:
        return "gpu" in self.cmd("sinfo", "-h", "-o", "%G").stdout


@dataclass
class Job:
    cluster: Cluster
    id: int
    output: Path

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait(self, deadline: float) -> dict[str, str]:
        """Poll until the job ends; cancel it and fail at ``deadline`` (time.monotonic())."""
        while True:
            info = self.info()
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                self.cluster.cmd("scancel", str(self.id), check=False)
                pytest.fail(f"job {self.id} still {info.get('JobState')} after its deadline\n"
                            f"{self.log()[-3000:]}")
            time.sleep(0.5)


def _free_port_block(n: int) -> int:
    for base in range(20817, 30000, 97):
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def _unavailable(reason: str) -> None:
    if os.environ.get("ALIGNFL_SLURM_REQUIRED") == "1":
        pytest.fail(f"SLURM required (ALIGNFL_SLURM_REQUIRED=1) but {reason}")
    pytest.skip(reason)


def _idle_nodes(env: dict[str, str]) -> int:
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, text=True,
                              capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.strip() in ("idle", "mix", "alloc") for line in proc.stdout.splitlines())


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The running test cluster (``SLURM_CONF``), or one started here and stopped after."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if shutil.which("sbatch") is None and not (os.geteuid() == 0 and shutil.which("apt-get")):
        _unavailable("SLURM is not installed and we are not root to install it "
                     "(as root: .ci/slurm.sh install)")
    if env.get("SLURM_CONF") and _idle_nodes(env) >= 2:
        yield Cluster(env)
        return
    if os.geteuid() != 0:
        _unavailable("no SLURM cluster with 2 nodes at SLURM_CONF, and starting one "
                     "(.ci/slurm.sh up) needs root")
    if shutil.which("slurmctld") is None:
        _unavailable("slurmctld is not installed: run .ci/slurm.sh install (as root)")
    state = tmp_path_factory.mktemp("slurm")
    env.update(ALIGNFL_SLURM_DIR=str(state), ALIGNFL_SLURM_PORT=str(_free_port_block(3)))
    try:
        up = subprocess.run([str(HARNESS), "up"], env=env, text=True, capture_output=True,
                            timeout=120)
    except subprocess.TimeoutExpired:
        up = subprocess.CompletedProcess([], 1, "", "timed out after 120 s")
    try:
        if up.returncode:
            _unavailable("SLURM could not start: " + (up.stderr.strip().splitlines() or ["?"])[-1])
        env["SLURM_CONF"] = str(state / "slurm.conf")
        yield Cluster(env)
    finally:
        subprocess.run([str(HARNESS), "down"], env=env, capture_output=True, timeout=120)


# --- the three runs -------------------------------------------------------------------------
def _config(path: Path, partition: Path) -> Path:
    """The MPI tests' tiny config (the scripts' ``--output`` replaces its run folder), with
    40 local epochs: rounds long enough (about a second) to be interrupted inside round 2."""
    write_config(path, partition, path.parent / "unused", n_clients=2, rounds=3)
    text = path.read_text().replace("local_epochs = 1\n", "local_epochs = 40\n")
    path.write_text(text.replace("final_drain_s = 60\n", "final_drain_s = 60\ndevice = \"cpu\"\n"))
    return path


def rounds_done(results: Path) -> int:
    """``rounds_completed`` of a results file that may be absent or being replaced."""
    try:
        with h5py.File(results, "r", locking=False) as f:
            return int(f.attrs.get("rounds_completed", 0))
    except (OSError, KeyError):
        return 0


def _first_round(results: Path) -> dict[str, float]:
    """Timings of round 1, measured once: a rerun of round 1 would change them."""
    res = load(results)
    return {k: float(v[0]) for k, v in res.timings.items() if k not in ("io", "round")}


@dataclass
class Interruption:
    """What an interrupting thread saw: the job's state when it was killed."""
    rounds_at_kill: int | None = None
    first_round: dict[str, float] = field(default_factory=dict)
    error: str = ""


def _interrupt_in_round_2(job: Job, results: Path, action: list[str], seen: Interruption,
                          deadline: float) -> None:
    try:
        while rounds_done(results) < 1:
            if job.info().get("JobState") in FINAL_STATES or time.monotonic() > deadline:
                seen.error = f"job {job.id} ended or timed out before round 1 was recorded"
                return
            time.sleep(0.05)
        job.cluster.cmd(*action)
        # The killed job's processes are gone once it is PENDING again; its restart waits
        # cred_expire + 1 = 11 s, so nothing has been written for round 2 yet.
        while True:
            info = job.info()
            if info.get("JobState") == "PENDING" or info.get("JobState") in FINAL_STATES:
                break
            if time.monotonic() > deadline:
                seen.error = f"job {job.id} still {info.get('JobState')} after {action}"
                return
            time.sleep(0.05)
        seen.rounds_at_kill = rounds_done(results)
        seen.first_round = _first_round(results)
    except Exception as exc:  # reported by the test that owns this run
        seen.error = f"{type(exc).__name__}: {exc}"


#: What slurmstepd's PMI server logs when a request reached it cut: srun's pmi2 plugin takes
#: a PMI-1 request in one read() of at most 1024 bytes, and MPICH's UCX business cards
#: (hex, in ~1 kB segments) can be longer. The scripts choose MPICH's ofi netmod under srun
#: (short business cards), so a job log shows none of these (docs/SLURM.md).
PMI_SERVER_ERRORS = ("mpi/pmi2: invalid client request", "not properly terminated",
                     "request not begin with")


@dataclass
class Runs:
    cluster: Cluster
    work: Path
    deadline: float
    jobs: dict[str, Job]
    seen: dict[str, Interruption]
    threads: list[threading.Thread]

    def results(self, name: str) -> Path:
        return self.work / name / "results.h5"

    def finish(self, name: str) -> tuple[dict[str, str], str]:
        """Wait for run ``name``; returns its final ``scontrol`` record and its output file."""
        job = self.jobs[name]
        info = job.wait(self.deadline)
        text = job.log()
        assert not [m for m in PMI_SERVER_ERRORS if m in text], ("PMI server errors", text)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
        assert "\r" not in text and "\x1b" not in text, "terminal control characters in " + text
        res = load(self.results(name))
        assert res.finished and len(res.rounds) == 3, (res.attrs, text)
        return info, text


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-runs")
    partition = tiny_partition(work / "partition.h5", n_clients=2)
    config = _config(work / "run.toml", partition)
    many_config = write_config(work / "many.toml", tiny_partition(work / "p4.h5", n_clients=4),
                               work / "unused", n_clients=4, rounds=3)
    many_config.write_text(many_config.read_text().replace(
        "final_drain_s = 60\n", "final_drain_s = 60\ndevice = \"cpu\"\n"))
    gpus = [] if cluster.has_gpus() else ["--gpus-per-node=0", "--gpus-per-task=0"]
    common = {"CONFIG": str(config), "ALIGNFL": str(VENV_BIN / "alignfl-mpi"),
              "ALIGNFL_DATA_ROOT": str(work / "data"), "OMP_NUM_THREADS": "1",
              "ALIGNFL_PRIVATE_DIR": str(work / "private")}
    jobs: dict[str, Job] = {}

    def submit(name: str, script: Path, opts: list[str], **env: str) -> None:
        jobs[name] = cluster.sbatch(script, *opts, *gpus, workdir=work, name=name,
                                    env=dict(common, OUT=str(work / name), **env))

    deadline = time.monotonic() + JOB_TIMEOUT_S
    seen: dict[str, Interruption] = {}
    threads: list[threading.Thread] = []
    launches = {"single": (SINGLE, TINY, {}), "requeued": (SINGLE, TINY, {"LAUNCHER": "mpiexec"}),
                "many": (MANY, TINY, {"CONFIG": str(many_config), "N_CLIENTS": "4",
                                      "FRACTION": "0.5", "POOL": "64"}),
                "preempted": (MULTI, TWO_NODES, {})}
    interrupt = {"requeued": ["scontrol", "requeue"],
                 "preempted": ["scancel", "--batch", "--signal=TERM"]}

    def start(name: str) -> None:
        """Submit run ``name``; a thread interrupts it in round 2 where it is to be."""
        script, opts, env = launches[name]
        submit(name, script, opts, **env)
        if name in interrupt:
            job = jobs[name]
            seen[name] = Interruption()
            t = threading.Thread(target=_interrupt_in_round_2, daemon=True,
                                 args=(job, work / name / "results.h5",
                                       [*interrupt[name], str(job.id)], seen[name], deadline))
            t.start()
            threads.append(t)

    try:
        for name in launches:
            start(name)
        if os.environ.get("ALIGNFL_SLURM_TIMER") == "1":
            submit("timer", SINGLE, [*TINY, "--time=2", "--signal=B:TERM@115"],
                   ALIGNFL=str(SLEEP_ONCE))
        yield Runs(cluster, work, deadline, jobs, seen, threads)
    finally:
        for job in jobs.values():
            if job.info().get("JobState") not in FINAL_STATES:
                cluster.cmd("scancel", str(job.id), check=False)
        for t in threads:
            t.join(timeout=10)


def assert_same_results(a: Path, b: Path) -> None:
    """Bit-for-bit: final global VAE, final decoders, per-round metrics and client losses."""
    ra, rb = load(a), load(b)
    assert ra.rounds == rb.rounds
    (_, ga), (_, gb) = ra.final_global(), rb.final_global()
    assert ga.keys() == gb.keys()
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k], err_msg=f"global {k}")
    da, db = ra.final_decoders(), rb.final_decoders()
    assert da.keys() == db.keys()
    for c in da:
        for k in da[c]["state"]:
            np.testing.assert_array_equal(da[c]["state"][k], db[c]["state"][k],
                                          err_msg=f"decoder {c} {k}")
    for k in ("loss", "latent_accuracy", "recon_error"):
        for table_a, table_b in ((ra.server, rb.server), (ra.eval, rb.eval)):
            if k in table_a:
                np.testing.assert_array_equal(table_a[k], table_b[k], err_msg=k)
    for c in ra.clients:
        np.testing.assert_array_equal(ra.clients[c]["loss"], rb.clients[c]["loss"])


def assert_resumed_after_round_1(runs: Runs, name: str, info: dict[str, str], text: str) -> None:
    seen = runs.seen[name]
    assert not seen.error, seen.error + "\n" + text
    assert seen.rounds_at_kill == 1, f"killed after {seen.rounds_at_kill} rounds, not in round 2"
    assert info["Restarts"] == "1", info
    assert "restart 1: resuming" in text, text
    # round 1 was not run again: its measured timings survived the restart unchanged
    assert _first_round(runs.results(name)) == seen.first_round
    assert_same_results(runs.results("single"), runs.results(name))


# --- tests ---------------------------------------------------------------------------------
def test_single_node_script_runs_to_finished_results(runs):
    info, text = runs.finish("single")
    assert info["Restarts"] == "0" and info["NumNodes"] == "1", info
    assert "srun --mpi=pmi2" in text, text  # auto: PyPI's MPICH speaks PMI-2
    assert "MPIR_CVAR_CH4_NETMOD=ofi" in text, text  # and has ofi: short business cards
    assert "[rank 0]" in text, text


def test_scontrol_requeue_in_round_2_resumes_bit_for_bit_under_mpiexec(runs):
    info, text = runs.finish("requeued")
    assert "DUE TO JOB REQUEUE" in text, text  # slurmstepd's line: SLURM killed and requeued it
    assert "mpiexec -n 3" in text, text
    assert_resumed_after_round_1(runs, "requeued", info, text)


def test_multi_node_script_sigterm_in_round_2_requeues_itself_and_resumes_bit_for_bit(runs):
    info, text = runs.finish("preempted")
    assert "SIGTERM: requeueing job" in text, text
    assert "srun --mpi=pmi2" in text, text
    assert "MPIR_CVAR_CH4_NETMOD=ofi" in text, text
    # the allocation spans both slurmd of this host
    assert info["NumNodes"] == "2" and info["NodeList"] == "ci[1-2]", info
    assert_resumed_after_round_1(runs, "preempted", info, text)


@pytest.mark.skipif(os.environ.get("ALIGNFL_SLURM_TIMER") != "1",
                    reason="SLURM's --signal timer test is opt-in (ALIGNFL_SLURM_TIMER=1): in "
                           "the full suite its job twice reached its limit unsignalled")
def test_signal_timer_makes_the_script_requeue_itself(runs):
    """SLURM checks time limits every 30 s: the signal due 5 s after the start comes by ~35 s.

    The 2-minute limit leaves three more checks before it, so a slow controller on a loaded
    machine still signals before the limit (with a 1-minute limit one loaded run timed out).
    """
    job = runs.jobs["timer"]
    info = job.wait(runs.deadline)
    text = job.log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    assert "SIGTERM: requeueing job" in text and "sleep_once: restart 1, done" in text, text
    assert "\r" not in text and "\x1b" not in text, text


def test_srun_lists_pmi2(cluster):
    plugins = cluster.cmd("srun", "--mpi=list").stdout + cluster.cmd(
        "srun", "--mpi=list", check=False).stderr
    assert "pmi2" in plugins, plugins


def test_gpu_binding_matches_local_rank_device(cluster, tmp_path):
    """The scripts' own GPU options, on the harness's fake GPUs: each rank's
    cuda:{local_rank % visible} must be a distinct GPU of its node."""
    if not cluster.has_gpus():
        pytest.skip("this cluster has no GPUs in its GRES")
    env = {"ALIGNFL": str(BINDING), "OUT": str(tmp_path / "unused")}
    single = cluster.sbatch(SINGLE, *TINY, workdir=tmp_path, name="bind1", env=env)
    multi = cluster.sbatch(MULTI, *TWO_NODES, workdir=tmp_path, name="bind2", env=env)
    deadline = time.monotonic() + 120
    # (GPUs each task sees, ranks per node); which GPU indices depends on other jobs' GPUs
    for job, n_visible, layout in ((single, 4, [3]), (multi, 1, [1, 2])):
        info = job.wait(deadline)
        text = job.log()
        assert info["JobState"] == "COMPLETED", (info, text)
        lines = re.findall(r"binding node=(\S+) rank=\d+ local=(\d+) cvd=(\S+)", text)
        assert len(lines) == 3, text
        per_node: dict[str, list[str]] = {}
        for node, local, cvd in lines:
            visible = cvd.split(",")
            assert len(visible) == n_visible and all(v.isdigit() for v in visible), text
            # the GPU that runtime.pick_device("auto") takes: cuda:{local_rank % n_visible}
            per_node.setdefault(node, []).append(visible[int(local) % len(visible)])
        assert sorted(len(v) for v in per_node.values()) == layout, text
        assert all(len(set(v)) == len(v) for v in per_node.values()), f"GPU shared: {text}"


def test_many_clients_script_places_four_clients_on_two_ranks_with_participation(runs):
    info, text = runs.finish("many")
    assert info["Restarts"] == "0", info
    assert "srun --mpi=pmi2" in text and "--set n_clients=4" in text, text
    res = load(runs.results("many"))
    assert sorted(set(res.attrs["placement"])) == [1, 2] and len(res.attrs["placement"]) == 4
    asked = [[c for c in range(4) if res.clients[c]["status"][r] == "ok"] for r in range(3)]
    assert [len(a) for a in asked] == [2, 2, 2], asked  # FRACTION=0.5 of 4 clients
    assert list(res.server["n_synthetic"]) == [64, 64, 64]  # POOL=64 in all, every round
