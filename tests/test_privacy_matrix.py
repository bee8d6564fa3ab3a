"""Every strategy x privacy mode x clipping x penalty x conditional x prior combination.

Each one is either refused at config load with one line, or honoured: a tiny local round
(no MPI) runs the settings, and a DP round reports its epsilon and whether it is covered.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import alignfl_mpi.client as client_mod
import alignfl_mpi.privacy as privacy_mod
import alignfl_mpi.strategies.fedprox as fedprox_mod
from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import load_config
from alignfl_mpi.errors import ConfigError
from alignfl_mpi.models import build_vae, model_spec
from alignfl_mpi.privacy import LOCAL_ONLY_METRICS
from alignfl_mpi.strategies import build_strategy

STRATEGIES = ("align-fl", "fedavg", "fedprox", "moon")
MODES = ("none", "decoder", "full")
CLIPPINGS = ("adaptive", "median", "flat")
PENALTIES = (0.0, 0.5)
CONDITIONAL = (False, True)
PRIORS = ("dp", "standard")
EPSILON = 8.0
COMBINATIONS = list(itertools.product(STRATEGIES, MODES, CLIPPINGS, PENALTIES, CONDITIONAL,
                                      PRIORS))


def overrides(strategy, mode, clipping, penalty, conditional, prior) -> list[str]:
    cond = str(conditional).lower()
    options = ["strategy_options.mu=0.01"] if strategy == "fedprox" else []
    return [f'strategy="{strategy}"', *options, "n_clients=2",
            f'client.privacy.mode="{mode}"', f'client.privacy.clipping="{clipping}"',
            f'client.privacy.prior="{prior}"', f"client.privacy.epsilon={EPSILON}",
            f"client.lipschitz.weight={penalty}", f"client.model.conditional={cond}",
            f"server.model.conditional={cond}", "client.model.hidden=[16, 8]",
            "server.model.hidden=[16, 8]", 'client.device="cpu"', "client.local_epochs=1",
            "client.batch_size=16", "client.prior_components=2"]


def must_refuse(strategy, mode, clipping, penalty, conditional, prior) -> bool:
    """The policy, stated independently of the code that enforces it."""
    baseline = strategy != "align-fl"
    return bool(
        (conditional and (baseline or mode != "none" or penalty > 0))  # labels not private
        or (baseline and mode == "decoder")  # the encoder is shared
        or (baseline and mode == "full" and prior == "dp"))  # N(0, I) is shared


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)


class Spy:
    """Counts the calls of the penalties a factory returns."""

    def __init__(self, factory):
        self.factory, self.calls = factory, 0

    def __call__(self, *args, **kwargs):
        inner = self.factory(*args, **kwargs)

        def counted(*a, **k):
            self.calls += 1
            return inner(*a, **k)
        if hasattr(inner, "reads_data"):
            counted.reads_data = inner.reads_data
        return counted


def test_matrix_has_every_combination() -> None:
    assert len(COMBINATIONS) == 4 * 3 * 3 * 2 * 2 * 2


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "-".join(map(str, c)))
def test_combination_is_honoured_or_refused_in_one_line(combo, data, monkeypatch) -> None:
    strategy, mode, clipping, penalty, conditional, prior = combo
    try:
        cfg = load_config(None, overrides=overrides(*combo))
        strategy_obj = build_strategy(cfg)
    except ConfigError as exc:
        assert must_refuse(*combo), f"refused but should run: {exc}"
        message = str(exc)
        assert "\n" not in message and len(message) < 300
        assert any(key in message for key in ("conditional", "privacy.mode", "privacy.prior"))
        return
    assert not must_refuse(*combo), "accepted but must be refused"

    spies = {"make_penalty": Spy(client_mod.make_penalty),
             "make_latent_penalty": Spy(privacy_mod.make_latent_penalty)}
    monkeypatch.setattr(client_mod, "make_penalty", spies["make_penalty"])
    monkeypatch.setattr(privacy_mod, "make_latent_penalty", spies["make_latent_penalty"])
    proximal = Spy(fedprox_mod.ProximalTerm)
    monkeypatch.setattr(fedprox_mod, "ProximalTerm", proximal)

    images, labels = data
    ccfg = cfg.client_config(0)
    state = new_local_state(0, ccfg, seed=0, device=torch.device("cpu"))
    state.extra["total_rounds"] = 1
    if strategy == "align-fl":
        update = strategy_obj.client_round(state, images, round_=0, labels=labels,
                                           global_state=None)
        assert set(update.state) == set(state.vae.decoder.state_dict())
    else:
        torch.manual_seed(1)
        global_state = {k: v.numpy() for k, v in build_vae(
            model_spec(cfg.server.model)).state_dict().items()}
        update = strategy_obj.client_round(state, images, round_=0, labels=labels,
                                           global_state=global_state)
        assert set(update.state) == set(state.vae.state_dict())
        assert (proximal.calls > 0) == (strategy == "fedprox")  # once per step
    metrics = update.metrics
    assert all(math.isfinite(v) for v in metrics.values())

    used = spies["make_latent_penalty" if mode != "none" else "make_penalty"].calls
    assert (used > 0) == (penalty > 0)
    assert spies["make_penalty" if mode != "none" else "make_latent_penalty"].calls == 0

    if mode == "none":
        assert "epsilon" not in metrics and "loss" in metrics and "train_s" in metrics
        return
    assert not set(LOCAL_ONLY_METRICS) & set(metrics)  # losses and wall time stay local
    covered = mode == "full" and clipping != "median"
    assert metrics["dp_accounted"] == (1.0 if covered else 0.0)
    # one planned round: the whole target is spent, not more; the cross-check is finite
    assert EPSILON * 0.99 <= metrics["epsilon"] <= EPSILON
    assert 0 < metrics["epsilon_prv"] <= metrics["epsilon"] * 1.01
    assert metrics["epsilon_prior"] > 0 if prior == "dp" else metrics["epsilon_prior"] == 0
    assert metrics["dp_steps"] == 2  # ceil(32 / 16) steps of one epoch
    if prior == "standard":
        np.testing.assert_array_equal(update.prior["means"], np.zeros((1, 2), np.float32))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sweep_covers_the_whole_epsilon_lambda_grid(tmp_path, strategy, caplog) -> None:
    from alignfl_mpi.sweep import run_sweep

    base = tmp_path / "base.toml"
    base.write_text(f'strategy = "{strategy}"\n')
    with caplog.at_level("INFO", logger="alignfl_mpi.sweep"):
        written = run_sweep(config=str(base), epsilons=[1.0, 2.0, 10.0, math.inf],
                            lips=[0.0, 0.1, 1.0], np_=3, out=tmp_path / "out", dry_run=True)
    assert len(written) == 12 and "skipped" not in caplog.text
    assert 'client.privacy.mode=\\"full\\"' in caplog.text or 'client.privacy.mode="full"' \
        in caplog.text
    assert ("privacy.prior" in caplog.text) == (strategy != "align-fl")


def test_sweep_resolves_each_run_from_the_preset_as_run_does(tmp_path, caplog) -> None:
    """The runs get ``--preset`` (default ``paper``, as for ``alignfl-mpi run``), and the
    settings are checked against that preset, not the built-in defaults."""
    from alignfl_mpi.errors import ConfigError
    from alignfl_mpi.sweep import run_sweep

    for preset, expected in ((None, "paper"), ("classic", "classic")):
        caplog.clear()
        with caplog.at_level("INFO", logger="alignfl_mpi.sweep"):
            run_sweep(config=None, epsilons=[math.inf], lips=[0.0], np_=3,
                      out=tmp_path / "out", dry_run=True, preset=preset)
        assert f"run --output {tmp_path / 'out' / 'mnist_epsinf_lip0'} --preset {expected} " \
            in caplog.text
    with pytest.raises(ConfigError, match="nope"):
        run_sweep(config=None, epsilons=[1.0], lips=[0.0], np_=3, out=tmp_path / "out",
                  dry_run=True, preset="nope")


def test_sweep_under_srun_says_which_netmod_to_choose(tmp_path, caplog, monkeypatch) -> None:
    from alignfl_mpi.sweep import run_sweep

    monkeypatch.delenv("MPIR_CVAR_CH4_NETMOD", raising=False)
    for launcher, env, warned in (("srun --mpi=pmi2", None, True), ("mpiexec", None, False),
                                  ("srun --mpi=pmi2", "ofi", False)):
        if env:
            monkeypatch.setenv("MPIR_CVAR_CH4_NETMOD", env)
        caplog.clear()
        run_sweep(config=None, epsilons=[math.inf], lips=[0.0], np_=3, out=tmp_path / "o",
                  launcher=launcher, dry_run=True)
        assert ("export MPIR_CVAR_CH4_NETMOD=ofi" in caplog.text) == warned, launcher
