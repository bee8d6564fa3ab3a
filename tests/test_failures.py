"""The failure model under mpiexec: every job ends, hostile ranks cannot hurt the server.

Each launch has a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mpi_helpers import MPI_SCRIPTS, _run_group, find_mpiexec, mpiexec_flags, run_sequence
from test_mpi_runtime import tiny_partition, write_config

from alignfl_mpi.results import load
from alignfl_mpi.runlock import RunLock

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")]

FAST = """
[output]
png = false
checkpoint = false
"""


def fast_config(tmp_path: Path, *, n_clients: int, rounds: int, server: str = "",
                output: str = "png = false") -> tuple[Path, Path]:
    """A tiny config whose rounds take well under a second; returns (config, run dir)."""
    part = tiny_partition(tmp_path / "p.h5", n_clients=n_clients)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", part, out, n_clients=n_clients, rounds=rounds)
    text = cfg.read_text().replace("final_drain_s = 60", "final_drain_s = 60\nquality_metrics "
                                   "= false\n" + server)
    text = text.replace("png = false", output)
    cfg.write_text(text)
    return cfg, out


def launch(cmd: list[str], *, timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a launcher command; a hang fails the test. Returns the process and its seconds."""
    start = time.monotonic()
    try:
        proc = _run_group(cmd, timeout=timeout, env=None)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd[:8])} ... hung for {timeout} s\n{exc.output}\n{exc.stderr}")
    return proc, time.monotonic() - start


def program() -> list[str]:
    exe = Path(sys.executable).parent / "alignfl-mpi"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "alignfl_mpi"]


def mpiexec() -> list[str]:
    m = find_mpiexec()
    assert m is not None
    return [m, *mpiexec_flags(m)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("alignfl-mpi: error")]


# --- item 1: any failure on rank 0 ends the job ------------------------------------------
@pytest.mark.parametrize("fault", ["checkpoint", "handle"])
def test_server_failure_aborts_job_and_keeps_results(tmp_path, fault):
    cfg, out = fast_config(tmp_path, n_clients=2, rounds=4, output="png = false")
    proc, _ = launch([*mpiexec(), "-n", "2", sys.executable,
                      str(MPI_SCRIPTS / "server_faults.py"), str(cfg), fault], timeout=150)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "server failed" in lines[0] and "aborting all ranks" in lines[0]
    assert f"traceback in {out / 'error.log'}" in lines[0]
    assert "Traceback" in (out / "error.log").read_text()
    res = load(out / "results.h5")  # readable, with the completed round(s)
    assert not res.finished
    if fault == "checkpoint":
        assert "No space left on device" in lines[0]
        assert res.rounds == [1, 2]  # round 2 was written before its checkpoint failed
    else:
        assert "injected failure while recording" in lines[0]
        assert res.rounds == [1]


@pytest.mark.mpi
def test_checkpoints_path_is_a_file_is_one_line(refusals):
    proc, out = refusals["checkpoints_file"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"alignfl-mpi: error: output path {out / 'checkpoints'} exists but is not a folder; "
        "remove it or choose another --output"], proc.stderr
    assert not (out / "results.h5").exists()


def test_client_loop_failure_aborts_job(tmp_path):
    cfg, out = fast_config(tmp_path, n_clients=2, rounds=4)
    proc, _ = launch([*mpiexec(), "-n", "3", sys.executable,
                      str(MPI_SCRIPTS / "server_faults.py"), str(cfg), "client-loop"],
                     timeout=150)
    assert proc.returncode != 0
    assert "injected failure outside the training step; aborting the job" in proc.stderr
    lines = error_lines(proc.stderr)  # rank 0 stops on the ERROR that names no client
    assert len(lines) == 1 and "client rank 2 failed outside training" in lines[0], proc.stderr
    res = load(out / "results.h5")  # so round 2 is never recorded
    assert not res.finished and res.rounds == [1]


# --- item 4: message limits ----------------------------------------------------------------
def test_client_send_failure_becomes_error_message(tmp_path):
    cfg, out = fast_config(tmp_path, n_clients=2, rounds=3)
    proc, _ = launch([*mpiexec(), "-n", "3", sys.executable,
                      str(MPI_SCRIPTS / "server_faults.py"), str(cfg), "client-send"],
                     timeout=150)
    assert proc.returncode == 0, proc.stderr
    res = load(out / "results.h5")
    assert res.finished and list(res.clients[1]["status"]) == ["ok", "error", "ok"]
    assert "over the limit" in res.clients[1]["error"][1]
    assert list(res.clients[0]["status"]) == ["ok"] * 3


# --- item 7 (and 4, 6): bad values are one line before any work -----------------------------
REFUSALS = {
    "start_timeout": "config key 'server.start_timeout_s' must be > 0, got -1.0",
    "final_drain": "config key 'server.final_drain_s' must be >= 0, got -1.0",
    "stop_timeout": "config key 'server.stop_timeout_s' must be > 0, got 0.0",
    "message_mb": "server.max_message_mb = 0.01 is smaller than client 0's decoder update",
    "output_under_file": "is under the file {tmp}/file; choose another",
    "empty_client": "client(s) [1] have no training samples; re-partition",
    "locked": "is in use by host ",
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Each bad value of REFUSALS (and a checkpoints path that is a file) refused by one run;
    all of them in ONE launch of 2 ranks (tests/mpi/sequence.py). Returns, per case, the
    run's result and its run folder."""
    import h5py

    from alignfl_mpi.schema import read_client

    root = tmp_path_factory.mktemp("refusals")
    steps, outs, lock = [], {}, None
    for case in [*REFUSALS, "checkpoints_file"]:
        tmp = root / case
        tmp.mkdir()
        cfg, out = fast_config(tmp, n_clients=2, rounds=2)
        outs[case] = out
        args = ["run", "--config", str(cfg)]
        if case == "start_timeout":
            args += ["--set", "server.start_timeout_s=-1"]
        elif case == "final_drain":
            args += ["--set", "server.final_drain_s=-1"]
        elif case == "stop_timeout":
            args += ["--set", "server.stop_timeout_s=0"]
        elif case == "message_mb":
            args += ["--set", "server.max_message_mb=0.01"]
        elif case == "output_under_file":
            (tmp / "file").write_text("x")
            args += ["--output", str(tmp / "file" / "run")]
        elif case == "empty_client":
            part = tmp / "p.h5"
            with h5py.File(part, "a") as f:
                for name in ("images", "labels", "outlier", "source_index"):
                    data = f[f"clients/1/{name}"][()][:0]
                    del f[f"clients/1/{name}"]
                    f[f"clients/1/{name}"] = data
            assert len(read_client(part, 1).labels) == 0
        elif case == "locked":  # held by this process for the whole launch
            out.mkdir(parents=True)
            lock = RunLock(out)
            lock.acquire()
            args += ["--resume"]
        elif case == "checkpoints_file":
            out.mkdir()
            (out / "checkpoints").write_text("not a folder")
        steps.append({"name": case, "argv": args})
    try:
        procs, _ = run_sequence(2, steps, root / "steps", timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"refusals: mpiexec hung\n{exc.output}\n{exc.stderr}")
    finally:
        if lock is not None:
            lock.release()
    return {case: (procs[case], outs[case]) for case in outs}


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_values_refused_up_front(refusals, case):
    proc, out = refusals[case]
    expect = REFUSALS[case].format(tmp=out.parent)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    if case == "locked":
        import os
        import socket

        assert f"host {socket.gethostname()} pid {os.getpid()}" in lines[0]
    assert not (out / "results.h5").exists()


# --- items 2, 3, 5: a hostile rank -------------------------------------------------------
ROGUE_REASONS = {
    "random bytes": "bad magic",
    "unknown tag": "unknown tag",
    "spoofed client id": "update claims client 0",
    "zero-size tensor with a huge dimension": "has an invalid shape",
    "huge integer metric": "metric 'loss' must be a finite number",
    "round over 2**63": "'round' must be an integer in 0..",
    "empty metric name": "metric name '' is not allowed",
    "enormous spec": "parameters, over the",
    "NaN-output decoder": "decoder outputs",
    "prior variance": "prior log-variances must lie in",
    "prior weights": "prior weights must be non-negative",
    "wrong round": "but the client was asked for round",
    "NUL in error text": "'message' must be a string",
    "oversized": "over the limit of",
    "unsolicited ready": "unexpected READY message",
}


def rogue_cmd(cfg: Path, mode: str, marker: Path) -> list[str]:
    run = [*program(), "run", "--config", str(cfg)]
    return [*mpiexec(), "-n", "2", *run, ":", "-n", "1", sys.executable,
            str(MPI_SCRIPTS / "rogue.py"), str(cfg), mode, str(marker), ":", "-n", "1", *run]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One launch for the two tests below: rank 2 answers each round with one class of the
    hostile catalogue, then with all of it at once, and floods rank 0 in the last round."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    rounds = len(ROGUE_REASONS) + 2  # one round per class as the answer, then all at once
    cfg, out = fast_config(tmp_path, n_clients=3, rounds=rounds,
                           server="max_message_mb = 1\nstop_timeout_s = 60")
    marker = tmp_path / "pickle-ran"
    proc, _ = launch(rogue_cmd(cfg, "flood", marker), timeout=400)
    return {"proc": proc, "out": out, "rounds": rounds, "marker": marker}


@pytest.mark.mpi
def test_rogue_rank_is_rejected_and_others_finish(hostile_run):
    proc, out, rounds = hostile_run["proc"], hostile_run["out"], hostile_run["rounds"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not hostile_run["marker"].exists(), "a pickle payload was executed"
    res = load(out / "results.h5")
    assert res.finished and res.rounds == list(range(1, rounds + 1))
    for c in (0, 2):
        assert list(res.clients[c]["status"]) == ["ok"] * rounds, c
    assert set(res.clients[1]["status"]) <= {"rejected"}, res.clients[1]["status"]
    assert res.clients[1]["unsolicited"][-1] > 0  # the last round's extra messages
    for key in ("latent_accuracy", "recon_error"):
        assert np.isfinite(res.eval[key]).all(), key
    assert np.isfinite(res.server["loss"]).all()
    spec, state = res.final_global()
    assert all(np.isfinite(v).all() for v in state.values())
    assert sorted(res.final_decoders()) == [0, 2]
    rejected = [line for line in proc.stderr.splitlines() if "(rank 2)" in line]
    for name, reason in ROGUE_REASONS.items():
        assert any(reason in line for line in rejected), f"{name}: no '{reason}' for rank 2"
    assert any("unsolicited UPDATE message" in line for line in rejected)


@pytest.mark.mpi
def test_flooding_rank_cannot_keep_the_job_alive(hostile_run):
    proc = hostile_run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert load(hostile_run["out"] / "results.h5").finished
    assert "message(s) after STOP dropped" in proc.stderr


def test_rank_that_ignores_stop_is_aborted_within_the_bound(tmp_path):
    cfg, out = fast_config(tmp_path, n_clients=3, rounds=2,
                           server="max_message_mb = 1\nstop_timeout_s = 3")
    proc, _ = launch(rogue_cmd(cfg, "deaf", tmp_path / "m"), timeout=200)
    assert proc.returncode != 0
    assert "clients [1] did not stop within 3 s; results are complete" in proc.stderr
    assert load(out / "results.h5").finished  # the results were complete before the abort
