"""The centralised VAE reference: the run's global VAE trained on the real union."""

from __future__ import annotations

import numpy as np
import pytest
from test_mpi_runtime import tiny_partition

from alignfl_mpi.cli import main
from alignfl_mpi.config import load_config
from alignfl_mpi.reference import centralized_vae
from alignfl_mpi.results import load

SMALL = ["server.model.hidden=[64, 32]", "server.batch_size=32"]


def test_centralized_vae_trains_the_server_model_and_records_every_epoch(tmp_path):
    part = tiny_partition(tmp_path / "p.h5", n_clients=3, n_per_client=60)
    cfg = load_config(preset="paper", overrides=SMALL)
    hist = centralized_vae(part, cfg, out=tmp_path / "vae", epochs=3, seed=1)
    assert len(hist) == 3
    assert hist[-1]["latent_accuracy"] > 0.9  # the 3 tiny classes are trivially separable
    assert hist[-1]["recon_error"] < hist[0]["recon_error"]
    res = load(tmp_path / "vae" / "results.h5")
    assert res.finished and res.config["strategy"] == "centralized-vae"
    assert res.config["server"]["kl_weight"] == 0.05
    np.testing.assert_allclose(res.eval["latent_accuracy"], [h["latent_accuracy"] for h in hist])
    for d in range(2):
        assert len(res.eval[f"latent_var_{d}"]) == 3
    assert res.eval["latent_var_min_ratio"][-1] == pytest.approx(hist[-1]["latent_var_min_ratio"])
    spec, state = res.final_global()
    assert spec["latent_dim"] == 2 and spec["hidden"] == [64, 32]
    assert res.server["n_train"][0] == 180.0  # the union of the clients' in-domain images


def test_centralized_vae_is_reproducible(tmp_path):
    part = tiny_partition(tmp_path / "p.h5", n_clients=2, n_per_client=40)
    cfg = load_config(preset="paper", overrides=SMALL)
    a = centralized_vae(part, cfg, out=tmp_path / "a", epochs=2, seed=4)
    b = centralized_vae(part, cfg, out=tmp_path / "b", epochs=2, seed=4)
    assert a == b


def test_reference_command_prints_the_vae_upper_bound(tmp_path, capsys):
    part = tiny_partition(tmp_path / "p.h5", n_clients=2, n_per_client=40)
    argv = ["reference", "--partition", str(part), "--out", str(tmp_path / "ref"),
            "--what", "vae", "--vae-epochs", "2", "--preset", "paper-dim8"]
    for s in SMALL:
        argv += ["--set", s]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("centralized-vae (upper bound of the global VAE, latent_dim 8, "
                           "2 epochs): latent acc ")
    assert "min/max" in line and str(tmp_path / "ref" / "centralized-vae") in line
    assert not (tmp_path / "ref" / "centralized").exists()  # --what vae: no classifiers


def test_reference_command_refuses_an_unknown_preset(tmp_path, capsys):
    part = tiny_partition(tmp_path / "p.h5", n_clients=2, n_per_client=40)
    assert main(["reference", "--partition", str(part), "--out", str(tmp_path / "r"),
                 "--preset", "nope"]) == 2
    assert capsys.readouterr().err.startswith("alignfl-mpi: error: unknown preset 'nope'")
