"""Multi-rank runtime tests under mpiexec (each with a timeout, so a hang fails)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from mpi_helpers import MPI_SCRIPTS, find_mpiexec, run_cli, run_mpi

from alignfl_mpi.results import load
from alignfl_mpi.schema import ClientData, write_partition

pytestmark = pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")


def tiny_partition(path, *, n_clients, n_per_client=64, seed=0):
    """A synthetic partition: client k holds bright squares at position k (no real data)."""
    rng = np.random.default_rng(seed)
    clients = []
    for k in range(n_clients):
        images = rng.integers(0, 30, size=(n_per_client, 28, 28)).astype(np.uint8)
        images[:, 4 + 4 * k: 10 + 4 * k, 8:20] = 220
        labels = np.full(n_per_client, 2 * k, np.int64)
        clients.append(ClientData(client_id=k, images=images, labels=labels,
                                  outlier=np.zeros(n_per_client, bool),
                                  source_index=np.arange(n_per_client, dtype=np.int64)))
    test_labels = np.repeat(np.arange(2 * n_clients, step=2), 20)
    test_images = np.concatenate([c.images[:20] for c in clients])
    write_partition(path, clients=clients, test_images=test_images, test_labels=test_labels,
                    outlier_test_images=np.zeros((0, 28, 28), np.uint8),
                    outlier_test_labels=np.zeros(0, np.int64),
                    attrs={"dataset": "synthetic", "outlier_dataset": "", "scheme": "manual",
                           "scheme_params": {}, "seed": seed, "n_outliers": 0,
                           "outlier_client": 0, "source_sha256": {}, "created": "",
                           "package_version": "test"})
    return path


def write_config(path, partition, out, *, n_clients, rounds=3, extra=""):
    """The MPI tests' tiny config. No PNGs and no stored synthetic sets: no test of these runs
    reads them (tests/test_e2e.py checks both in a real run), and they cost every launch."""
    path.write_text(f"""
rounds = {rounds}
n_clients = {n_clients}
seed = 3
[data]
partition = "{partition}"
[client]
local_epochs = 1
batch_size = 32
prior_components = 2
device = "cpu"
[client.model]
hidden = [32, 16, 8]
[server]
samples_per_client = 32
epochs = 1
batch_size = 32
final_drain_s = 60
[server.model]
hidden = [32, 16, 8]
[output]
dir = "{out}"
save_synthetic = false
png = false
{extra}
""")
    return path


def launch(n, *args, timeout=180, **kw):
    try:
        return run_cli(n, *args, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {n} {' '.join(args)} hung\n{exc.output}\n{exc.stderr}")


@pytest.mark.slow
def test_faults_mixed_architectures_and_stragglers(tmp_path):
    n = 4
    part = tiny_partition(tmp_path / "p.h5", n_clients=n)
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", part, out, n_clients=n, rounds=3, extra="""
[[clients]]
model = {arch = "conv", latent_dim = 4, hidden = [8, 16]}
[[clients]]
model = {arch = "mlp", latent_dim = 3, hidden = [48, 24, 12]}
[[clients]]
[[clients]]
""".replace("[output]", ""))
    text = cfg.read_text().replace("final_drain_s = 60",
                                   "final_drain_s = 60\nround_deadline_s = 3.0")
    cfg.write_text(text)
    try:
        proc = run_mpi(MPI_SCRIPTS / "runtime_faults.py", n + 1, str(cfg), "6", timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"runtime with faults hung\n{exc.output}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = load(out / "results.h5")
    assert res.finished and res.rounds == [1, 2, 3]
    status = {c: list(res.clients[c]["status"]) for c in range(n)}
    # client 1 raised in round 1: an error with rank, host and traceback; others went on
    assert status[1] == ["ok", "error", "ok"], status
    err = res.clients[1]["error"][1]
    assert "rank 2 on" in err and "RuntimeError: injected failure in round 1" in err
    assert "Traceback" in res.clients[1]["traceback"][1]
    # client 2's NaN update in round 0 was rejected and the run went on
    assert status[2][0] == "rejected" and "non-finite" in res.clients[2]["error"][0]
    assert status[2][1:] == ["ok", "ok"]
    # client 3 missed the deadline in round 0; its late update was drained and accepted
    assert status[3][0] == "straggler", status
    decoders = res.final_decoders()
    assert set(decoders) == {0, 1, 2, 3}
    assert "late" in status[3] or decoders[3]["round"] == 1
    # mixed architectures and latent dims were rebuilt by the server
    assert decoders[0]["spec"]["arch"] == "conv" and decoders[0]["spec"]["latent_dim"] == 4
    assert decoders[1]["spec"]["latent_dim"] == 3 and decoders[2]["spec"]["latent_dim"] == 2
    assert decoders[1]["round"] == 3  # its round-2 failure kept the round-1 decoder until round 3
    assert res.server["n_synthetic"][0] == 2 * 32  # round 1: only clients 0 and 1 delivered
    assert "[rank 0]" in proc.stderr


@pytest.mark.mpi
def test_bad_partition_stops_every_rank(small_runs):
    proc, _ = small_runs["bad_partition"]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "partition has 2 clients but the run is configured for 3" in proc.stderr


def _final_global(path):
    spec, state = load(path).final_global()
    return state


@pytest.mark.mpi
def test_resume_equals_uninterrupted(resume_scenario):
    """A run started with 1 round and resumed twice (to 2, then 3 rounds) ends bit for bit
    equal to the same run uninterrupted; resuming with other settings, or a new run into the
    folder, is refused and loses nothing (the launches: conftest.py's resume_scenario)."""
    s = resume_scenario
    procs = s["procs"]
    for name in ("full", "fresh", "resume2", "resume3"):
        assert procs[name].returncode == 0, f"{name}: {procs[name].stderr}"
    assert "resuming after round 2" in procs["resume3"].stderr
    a, b = _final_global(s["full"]), _final_global(s["resumed"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra, rb = load(s["full"]), load(s["resumed"])
    assert ra.rounds == rb.rounds == [1, 2, 3]
    np.testing.assert_array_equal(ra.eval["latent_accuracy"], rb.eval["latent_accuracy"])
    np.testing.assert_array_equal(ra.clients[1]["loss"], rb.clients[1]["loss"])
    # resuming with other settings than the run's own is refused, nothing is lost
    proc = procs["changed"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("--resume: the settings differ from the run's own in server.epochs (3 now, 1 "
            "stored)") in proc.stderr, proc.stderr
    assert s["unchanged_by_changed"]
    # a new run into an existing results directory is refused, nothing is lost
    proc = procs["exists"]
    assert proc.returncode != 0 and "already exists; pass --resume" in proc.stderr
    assert s["unchanged_by_exists"]


# FedProx under mpiexec runs with DP in test_dp_baselines.py (the same launch checks what this
# one does and the privacy accounting); DP-FedAvg's client round is unit-tested there.
@pytest.mark.mpi
def test_baselines_run_under_mpiexec(small_runs):
    proc, folder = small_runs["fedavg"]
    assert proc.returncode == 0, proc.stderr
    res = load(folder / "results.h5")
    assert res.finished and res.config["strategy"] == "fedavg"
    assert list(res.server["n_averaged"]) == [2.0, 2.0]
    # the whole VAE travels: much larger than a decoder-only update
    assert (res.clients[0]["message_bytes"] > 2 * 32 * 784 * 4).all()
    assert sorted(res.final_decoders()) == [0, 1]
    assert np.isfinite(res.eval["latent_accuracy"]).all()


@pytest.mark.mpi
def test_baselines_refuse_mixed_architectures(small_runs):
    proc, _ = small_runs["fedavg_mixed"]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "strategy 'fedavg' averages weights and needs every client to have the server's model" \
        in proc.stderr


@pytest.mark.mpi
def test_sweep_runs_each_setting_and_skips_finished(tmp_path):
    import sys
    from pathlib import Path

    part = tiny_partition(tmp_path / "p.h5", n_clients=2)
    cfg = write_config(tmp_path / "c.toml", part, tmp_path / "unused", n_clients=2, rounds=1)
    exe = Path(sys.executable).parent / "alignfl-mpi"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
                                                           ["-m", "alignfl_mpi"]),
           "sweep", "--config", str(cfg), "--epsilon", "5", "inf", "--lip", "0", "--np", "2",
           "--out", str(tmp_path / "sweep"), "--launcher", find_mpiexec()]
    from mpi_helpers import mpi_env
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    eps5 = load(tmp_path / "sweep" / "mnist_eps5_lip0" / "results.h5")
    inf = load(tmp_path / "sweep" / "mnist_epsinf_lip0" / "results.h5")
    assert eps5.config["client"]["privacy"]["mode"] == "full"
    assert eps5.config["client"]["privacy"]["epsilon"] == 5.0
    assert inf.config["client"]["privacy"]["mode"] == "none"
    assert eps5.clients[0]["epsilon"][0] <= 5.0 * 1.01
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0 and proc.stderr.count("finished, skipped") == 2, proc.stderr


@pytest.mark.mpi
def test_conditional_clients_and_synthetic_classifier(small_runs):
    proc, folder = small_runs["conditional"]
    assert proc.returncode == 0, proc.stderr
    res = load(folder / "results.h5")
    assert ((res.eval["task_accuracy"] >= 0) & (res.eval["task_accuracy"] <= 1)).all()
    assert (res.server["classifier_samples"] == 64).all()
    assert "task acc" in proc.stderr
    assert res.final_decoders()[0]["spec"]["n_classes"] == 11
    assert "class_weights" in res.final_decoders()[0]["prior"]
