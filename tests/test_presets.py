"""The shipped presets: paper (the default of `run`), paper-dim8, classic, dp-eps2."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignfl_mpi.cli import build_parser
from alignfl_mpi.config import (
    DEFAULT_PRESET,
    PRESET_DIR,
    available_presets,
    load_config,
    preset_path,
    to_dict,
)
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.runtime import resolve_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("classic", "dp-eps2", "paper", "paper-dim8")


def test_the_presets_ship_inside_the_package_and_configs_points_there():
    assert set(SHIPPED) <= set(available_presets())
    assert PRESET_DIR.parent.name == "alignfl_mpi"
    assert (REPO / "configs").resolve() == PRESET_DIR
    assert "alignfl_mpi = configs/*.toml" in (REPO / "setup.cfg").read_text()


@pytest.mark.parametrize("name", SHIPPED)
def test_a_preset_is_the_same_by_name_as_a_file_and_on_top_of_paper(name):
    by_name = load_config(preset=name)
    path = REPO / "configs" / f"{name}.toml"
    assert load_config(path) == by_name
    assert load_config(path, preset="paper") == by_name  # run --config FILE starts from paper


@pytest.mark.parametrize("latent_dim, name", [(2, "paper"), (8, "paper-dim8")])
def test_paper_presets_hold_the_reference_codes_settings(latent_dim, name):
    cfg = load_config(preset=name)
    c, s = cfg.client, cfg.server
    assert c.model.latent_dim == s.model.latent_dim == latent_dim
    assert c.model.arch == s.model.arch == "mlp" and c.model.hidden == ()
    # lambda_kl = 0.1 on the KL averaged over the latent dims == 0.1 / D on the summed KL
    assert c.kl_weight == s.kl_weight == pytest.approx(0.1 / latent_dim)
    assert c.prior_fit_on == "z" and c.prior_components == 10
    assert c.fresh_optimizer and s.fresh_optimizer  # a new Adam every round
    assert c.prior_fitter == "sklearn"  # GaussianMixture(diag, random_state=42)
    assert (c.local_epochs, c.batch_size, c.lr) == (10, 128, 1e-3)
    assert (s.epochs, s.samples_per_client, s.batch_size, s.lr) == (5, 1000, 128, 1e-3)
    assert cfg.n_clients == 5 and cfg.data.scheme == "class-pairs" and cfg.data.outliers == 600
    assert cfg.rounds == (5 if name == "paper" else 10)


def test_classic_is_the_builtin_default_and_differs_from_paper_in_the_named_settings():
    classic, paper = load_config(preset="classic"), load_config(preset="paper")
    assert classic == load_config()
    diff = {k for k, v in to_dict(paper.client).items() if to_dict(classic.client)[k] != v}
    assert diff == {"kl_weight", "prior_fit_on", "prior_fitter", "fresh_optimizer"}
    assert (classic.server.epochs, classic.server.kl_weight) == (10, 1.0)
    assert not classic.client.fresh_optimizer and not classic.server.fresh_optimizer


def test_dp_preset_is_paper_with_dp():
    dp, paper = load_config(preset="dp-eps2"), load_config(preset="paper")
    assert dp.client.privacy.mode == "full" and dp.client.privacy.epsilon == 2.0
    assert dataclasses.replace(dp.client, privacy=paper.client.privacy) == paper.client
    assert dp.server == paper.server


def test_run_starts_from_paper_unless_told_otherwise(tmp_path):
    def args(*argv):
        return build_parser().parse_args(["run", *argv])

    assert DEFAULT_PRESET == "paper"
    assert resolve_config(args()) == load_config(preset="paper")
    assert resolve_config(args("--preset", "classic", "--rounds", "2")) == \
        load_config(preset="classic", overrides=["rounds=2"])
    user = tmp_path / "run.toml"
    user.write_text("[server]\nepochs = 7\n")
    cfg = resolve_config(args("--config", str(user), "--set", "client.prior_fit_on=\"mu\""))
    assert cfg.server.epochs == 7 and cfg.client.prior_fit_on == "mu"
    assert cfg.client.kl_weight == 0.05  # the rest is still paper's
    legacy = argparse.Namespace(set=[], rounds=None, seed=None, output=None, data_root=None,
                                config=None)  # callers without the flag get paper too
    assert resolve_config(legacy).client.prior_fit_on == "z"


def test_unknown_preset_is_one_line_listing_the_available_ones():
    with pytest.raises(ConfigError) as err:
        preset_path("papr")
    msg = str(err.value)
    assert "unknown preset 'papr'" in msg and "did you mean 'paper'" in msg
    assert all(name in msg for name in SHIPPED) and "\n" not in msg


def test_unknown_preset_on_the_command_line_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alignfl_mpi", "run", "--preset", "nope",
                           "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("alignfl-mpi: error: unknown preset 'nope'")
    assert "Traceback" not in proc.stderr and "paper-dim8" in lines[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, where", [
    ('client.prior_fit_on="sample"', "client.prior_fit_on"),
    ('clients.1.prior_fit_on="means"', "clients[1].prior_fit_on"),
])
def test_bad_prior_fit_on_is_refused(override, where):
    extra = ["n_clients=2", "data.outlier_client=0"]
    if override.startswith("clients"):
        extra.append('clients.0.device="cpu"')
    pattern = re.escape(where) + r"': unknown value .*choose one of: z, mu"
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[*extra, override], preset="paper")
