"""End to end: the real CLI under mpiexec on a tiny real-MNIST partition, results read back."""

import subprocess

import numpy as np
import pytest
from mpi_helpers import find_mpiexec

from alignfl_mpi.results import load
from alignfl_mpi.schema import read_partition_info

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")]

CONFIG = """
rounds = 2
[data]
scheme_params = {per_class = 40}
outliers = 10
[client]
local_epochs = 1
batch_size = 32
prior_components = 3
[client.model]
hidden = [64, 32, 16]
[server]
samples_per_client = 20
epochs = 1
[server.model]
hidden = [64, 32, 16]
[output]
save_synthetic = true
"""


@pytest.fixture(scope="module")
def real_runs(real_root, tmp_path_factory):
    """Three runs on the real-MNIST partition, one after the other in ONE launch of 3 ranks
    (tests/mpi/sequence.py; 5 clients on 2 client ranks): ``plain``, ``dp`` and
    ``lipschitz``. No FID-LeNet: training it on 60000 images would be most of their time,
    and nothing here reads the quality metrics (tests/test_metrics.py does)."""
    from mpi_helpers import run_sequence

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tmp / "tiny.toml"
    cfg.write_text(CONFIG)
    flags = {"plain": ["--set", "server.epochs=2"],
             "dp": ["--set", "client.privacy.mode=full", "--set", "client.privacy.epsilon=5"],
             "lipschitz": ["--set", "client.lipschitz.weight=1.0"]}
    steps = [{"name": name, "argv": [
        "run", "--config", str(cfg), "--data-root", str(real_root), "--output",
        str(tmp / name), "--set", "server.quality_metrics=false", *extra]}
        for name, extra in flags.items()]
    try:
        procs, _ = run_sequence(3, steps, tmp / "steps", timeout=500)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"run hung\n{exc.output}\n{exc.stderr}")
    return tmp, procs


@pytest.mark.mpi
def test_cli_run_on_real_mnist(real_runs, real_root):
    tmp, procs = real_runs
    proc, out = procs["plain"], tmp / "plain"
    assert proc.returncode == 0, proc.stderr
    # progress per round on rank 0, with the key metrics
    assert "[rank 0] round 1/2 | clients ok 5/5" in proc.stderr
    assert "latent acc" in proc.stderr
    part = real_root / "partitions" / "mnist_class-pairs-per_class40_c5_o10_oc0_s0.h5"
    info = read_partition_info(part, expected_clients=5)
    assert info.attrs["client_sizes"] == [90, 80, 80, 80, 80]

    res = load(out / "results.h5")
    assert res.finished and res.rounds == [1, 2]
    assert res.config["rounds"] == 2 and res.config["server"]["epochs"] == 2  # --set stored
    assert res.config["data"]["scheme_params"] == {"per_class": 40}
    assert res.attrs["partition"] == str(part)
    info = res.attrs["clients_info"]
    assert sorted(info) == ["0", "1", "2", "3", "4"] and info["0"]["device"] == "cpu"
    assert info["0"]["n_samples"] == 90
    for c in range(5):
        assert list(res.clients[c]["status"]) == ["ok", "ok"]
        assert (res.clients[c]["message_bytes"] > 100_000).all()
        assert np.isfinite(res.clients[c]["loss"]).all()
    for key in ("latent_accuracy", "latent_f1"):
        assert ((res.eval[key] >= 0) & (res.eval[key] <= 1)).all()
    assert np.isfinite(res.eval["recon_error"]).all()
    assert np.isfinite(res.server["loss"]).all() and (res.server["n_synthetic"] == 100).all()
    for key in ("client_training", "communication", "sampling", "server_training",
                "evaluation", "io", "round"):
        assert (res.timings[key] >= 0).all(), key
    assert (res.timings["round"] >= res.timings["server_training"]).all()
    images, labels = res.synthetic(1)
    assert images.shape == (100, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [20] * 5
    spec, state = res.final_global()
    assert spec["arch"] == "mlp" and any(k.startswith("decoder.") for k in state)
    assert any(k.startswith("encoder.") for k in state)
    assert sorted(res.final_decoders()) == [0, 1, 2, 3, 4]
    for r in (1, 2):
        assert (out / "png" / f"global_r{r:04d}.png").stat().st_size > 1000
        assert (out / "png" / f"clients_r{r:04d}.png").stat().st_size > 1000


@pytest.mark.mpi
@pytest.mark.parametrize("setting", ["dp", "lipschitz"])
def test_dp_and_lipschitz_runs_record_privacy(real_runs, setting):
    tmp, procs = real_runs
    proc, out = procs[setting], tmp / setting
    assert proc.returncode == 0, proc.stderr
    res = load(out / "results.h5")
    assert res.finished
    for c in range(5):
        assert (res.clients[c]["lip_empirical"] > 0).all()
        assert (res.clients[c]["lip_upper_bound"] >= res.clients[c]["lip_empirical"]).all()
    if setting == "dp":
        eps = res.clients[0]["epsilon"]
        assert eps[0] < eps[1] <= 5.0 * 1.01  # grows, ends at the target
        assert (res.clients[0]["dp_accounted"] == 1.0).all()
        assert "loss" not in res.clients[0]  # exact losses stay on the client
        assert "survival_recon_client" not in res.clients[0]
    else:
        assert (res.clients[0]["penalty"] > 0).all()
        assert ((res.clients[0]["survival_recon_client"] >= 0)
                & (res.clients[0]["survival_recon_client"] <= 1)).all()
    for key in ("survival_synthetic", "survival_recon_global", "dcr_ratio", "mia_auc_outliers",
                "mia_auc_inliers", "classifier_accuracy", "survival_synthetic_control",
                "survival_recon_control"):
        assert np.isfinite(res.eval[key]).all(), key
    assert (res.eval["classifier_accuracy"] > 0.95).all()
