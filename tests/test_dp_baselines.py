"""DP-FedAvg and DP-FedProx: the averaging round through the DP-SGD trainer and accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mpi_helpers import find_mpiexec
from strategy_helpers import local_round

from alignfl_mpi.checkpoint import load_checkpoint, save_raw_checkpoint
from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, LipschitzConfig, ModelConfig, PrivacyConfig
from alignfl_mpi.models import ModelSpec, build_vae
from alignfl_mpi.privacy import LOCAL_ONLY_METRICS, PrivacyLedger

CPU = torch.device("cpu")
HIDDEN = (16, 8)


def dp_cfg(**privacy) -> ClientConfig:
    return ClientConfig(model=ModelConfig(hidden=HIDDEN), device="cpu", local_epochs=1,
                        batch_size=16, prior_components=2,
                        privacy=PrivacyConfig(**{"mode": "full", "prior": "standard",
                                                 "epsilon": 4.0, **privacy}))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def global_arrays(seed: int = 1) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    vae = build_vae(ModelSpec(arch="mlp", hidden=HIDDEN))
    return {k: v.numpy().copy() for k, v in vae.state_dict().items()}


def averaging_round(state, images, global_state, *, round_: int, seed: int, mu: float = 0.0):
    """A DP-FedAvg (``mu = 0``) or DP-FedProx local round."""
    if mu > 0:
        return local_round(state, images, round_=round_, seed=seed, strategy="fedprox",
                           global_state=global_state, mu=mu)
    return local_round(state, images, round_=round_, seed=seed, strategy="fedavg",
                       global_state=global_state)


def fresh_state(cfg: ClientConfig, rounds: int = 2):
    state = new_local_state(0, cfg, seed=0, device=CPU)
    state.extra["total_rounds"] = rounds
    return state


@pytest.mark.parametrize("mu", [0.0, 0.05])
def test_dp_averaging_round_privatises_the_whole_vae_and_accounts(images, mu) -> None:
    cfg = dp_cfg()
    state = fresh_state(cfg)
    glob = global_arrays()
    update = averaging_round(state, images, glob, round_=0, seed=0, mu=mu)
    m = update.metrics
    assert not set(LOCAL_ONLY_METRICS) & set(m)  # exact losses and wall time stay local
    assert m["dp_accounted"] == 1.0 and m["dp_steps"] == 3 and m["epsilon_prior"] == 0.0
    assert 0 < m["epsilon"] < 4.0  # half of the two planned rounds
    assert set(update.state) == set(state.vae.state_dict())  # the whole VAE travels
    assert all(np.isfinite(v).all() for v in update.state.values())
    # every parameter, encoder included, moved: all of them went through DP-SGD
    for name, value in update.state.items():
        assert not np.array_equal(value, glob[name]), name
    update2 = averaging_round(state, images, glob, round_=1, seed=0, mu=mu)
    assert update2.metrics["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert update2.metrics["epsilon"] <= 4.0
    assert update2.metrics["dp_steps"] == 6


def test_dp_fedprox_proximal_term_is_added_after_the_noise(images) -> None:
    """Same secret, same global model: FedProx's update differs from FedAvg's only by the
    proximal gradient (zero at the first step), and epsilon is identical."""
    results = []
    for mu in (0.0, 5.0):
        state = fresh_state(dp_cfg(clipping="flat"))
        state.extra["privacy"] = {"secret": 7}
        results.append(averaging_round(state, images, global_arrays(), round_=0, seed=0,
                                           mu=mu))
    (avg, prox) = results
    for key in ("epsilon", "epsilon_prv", "noise_multiplier", "clip_bound", "dp_steps"):
        assert avg.metrics[key] == prox.metrics[key], key
    assert any(not np.array_equal(avg.state[k], prox.state[k]) for k in avg.state)


def test_dp_averaging_resume_repeats_the_round_exactly(images, tmp_path) -> None:
    cfg = dp_cfg(clipping="adaptive")
    state = fresh_state(cfg, rounds=2)
    glob = global_arrays()
    averaging_round(state, images, glob, round_=0, seed=0)
    save_raw_checkpoint(tmp_path / "c.ckpt", state.checkpoint_state())  # as the runtime does
    again = averaging_round(state, images, glob, round_=1, seed=0)
    resumed = fresh_state(cfg, rounds=2)
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.ckpt"))
    replay = averaging_round(resumed, images, glob, round_=1, seed=0)
    assert replay.metrics == again.metrics
    for key, value in again.state.items():
        np.testing.assert_array_equal(replay.state[key], value)
    ledger = PrivacyLedger.from_extra(resumed.extra)
    assert ledger.sgd_history[0][2] == 6 and ledger.prior_history == []


def test_dp_fedadam_client_round_is_dp_fedavgs(images) -> None:
    """FedAdam changes only the server step: its DP client round is DP-FedAvg's."""
    updates = []
    for strategy in ("fedavg", "fedadam"):
        state = fresh_state(dp_cfg())
        state.extra["privacy"] = {"secret": 11}
        updates.append(local_round(state, images, round_=0, seed=0, strategy=strategy,
                                   global_state=global_arrays()))
    avg, adam = updates
    assert adam.metrics == avg.metrics and adam.metrics["dp_accounted"] == 1.0
    for key, value in avg.state.items():
        np.testing.assert_array_equal(adam.state[key], value)


def test_dp_averaging_with_lipschitz_penalty(images) -> None:
    cfg = ClientConfig(**{**dp_cfg().__dict__, "lipschitz": LipschitzConfig(weight=1.0)})
    update = averaging_round(fresh_state(cfg), images, global_arrays(), round_=0, seed=0)
    assert "penalty" not in update.metrics and update.metrics["dp_accounted"] == 1.0
    assert math.isfinite(update.metrics["epsilon"])


# --------------------------------------------------------------------------- under mpiexec


@pytest.mark.skipif(find_mpiexec() is None, reason="no mpiexec available")
@pytest.mark.parametrize("strategy", ["fedprox", "moon", "align-fl"])
def test_dp_baseline_records_epsilon_under_mpiexec(small_runs, strategy) -> None:
    """DP-FedProx (a FedAvg subclass: DP-FedAvg's launch would repeat it; its client round is
    unit-tested above); DP-MOON (its term clipped with each sample's loss from round 2); and
    ALIGN-FL with DP, the DP prior and lambda_lip > 0 (runs of the ``small_runs`` launch,
    conftest.py).

    The FedProx run is also the FedProx baseline under mpiexec: the whole VAE travels, both
    decoders are kept, the global model is evaluated."""
    from alignfl_mpi.results import load

    proc, folder = small_runs[f"dp_{strategy}"]
    assert proc.returncode == 0, proc.stderr
    res = load(folder / "results.h5")
    assert res.finished
    if strategy != "align-fl":
        assert res.config["strategy"] == strategy
        assert list(res.server["n_averaged"]) == [2.0, 2.0]
        # the whole VAE travels: much larger than a decoder-only update
        assert (res.clients[0]["message_bytes"] > 2 * 32 * 784 * 4).all()
        assert sorted(res.final_decoders()) == [0, 1]
        assert np.isfinite(res.eval["latent_accuracy"]).all()
    for c in (0, 1):
        eps = res.clients[c]["epsilon"]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 3.0
        assert eps[1] == pytest.approx(3.0, rel=0.01)
        assert (res.clients[c]["dp_accounted"] == 1.0).all()
        assert not {"loss", "recon", "kl", "penalty", "train_s"} & set(res.clients[c])
        assert (res.clients[c]["epsilon_prior"] > 0).all() == (strategy == "align-fl")
    spent = res.epsilon_spent()
    assert spent.dp and spent.accounted and spent.value == pytest.approx(3.0, rel=0.01)


def test_dp_baseline_with_dp_prior_is_refused_in_one_line(tmp_path) -> None:
    from alignfl_mpi.config import load_config
    from alignfl_mpi.errors import ConfigError
    from alignfl_mpi.strategies import build_strategy

    with pytest.raises(ConfigError, match="privacy.prior") as info:
        build_strategy(load_config(None, overrides=['strategy="fedavg"',
                                                    'client.privacy.mode="full"']))
    assert "\n" not in str(info.value)
