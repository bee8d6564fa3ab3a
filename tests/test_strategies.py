"""The strategy interface: registry, options, the client and server halves without MPI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from strategy_helpers import local_round, to_message

from alignfl_mpi.client import new_local_state
from alignfl_mpi.config import ClientConfig, ModelConfig, load_config
from alignfl_mpi.errors import ConfigError, MessageError
from alignfl_mpi.messages import ClientUpdate, GlobalModel
from alignfl_mpi.server import ServerState
from alignfl_mpi.strategies import STRATEGIES, Strategy, build_strategy
from alignfl_mpi.strategies.fedavg import average_states

CPU = torch.device("cpu")
HIDDEN = "[16, 8]"
PACKAGE = Path(__file__).resolve().parents[1] / "alignfl_mpi"


def _cfg(strategy: str = "align-fl", *extra: str):
    return load_config(overrides=[f'strategy="{strategy}"', "n_clients=2",
                                  f"client.model.hidden={HIDDEN}",
                                  f"server.model.hidden={HIDDEN}", "client.local_epochs=1",
                                  "client.batch_size=16", "client.prior_components=2",
                                  "server.samples_per_client=16", "server.epochs=1",
                                  "server.classifier_epochs=0", *extra])


def _client(cfg, k=0):
    return new_local_state(k, cfg.client_config(k), seed=cfg.seed, device=CPU)


# --- registry and configuration ------------------------------------------------------------
def test_registry_maps_names_to_strategy_classes():
    assert set(STRATEGIES) >= {"align-fl", "fedavg", "fedprox"}
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name and cls.title
        assert cls.update_kind in ("decoder", "model")


def test_unknown_strategy_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        build_strategy(load_config(overrides=['strategy="fedavgg"']))


def test_unknown_option_is_refused_and_options_have_defaults():
    with pytest.raises(ConfigError, match="strategy_options.mu is not an option of strategy "
                                          "'fedavg'"):
        build_strategy(_cfg("fedavg", "strategy_options.mu=0.1"))
    assert build_strategy(_cfg("fedprox")).options == {"mu": 0.01}
    assert build_strategy(_cfg("fedprox", "strategy_options.mu=0.5")).options["mu"] == 0.5
    with pytest.raises(ConfigError, match="must be >= 0"):
        build_strategy(_cfg("fedprox", "strategy_options.mu=-1"))


def test_averaging_strategies_need_the_servers_model_and_no_labels():
    with pytest.raises(ConfigError, match="needs every client to have the server's model"):
        build_strategy(_cfg("fedavg", "client.model.latent_dim=3"))
    with pytest.raises(ConfigError, match="conditional is not supported by strategy"):
        build_strategy(_cfg("fedavg", "client.model.conditional=true",
                            "server.model.conditional=true"))
    build_strategy(_cfg("align-fl", "client.model.conditional=true",
                        "server.model.conditional=true"))


def test_no_module_outside_strategies_tests_a_strategy_name():
    names = "|".join(re.escape(n) for n in STRATEGIES)
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*"""
                         r"""(==|!=)""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "strategies" in path.relative_to(PACKAGE).parts:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{no}: {line.strip()}")
    assert not offenders, offenders


# --- ALIGN-FL ------------------------------------------------------------------------------
def test_align_fl_shares_the_decoder_and_trains_the_global_model_on_the_pool():
    cfg = _cfg()
    strategy, server = build_strategy(cfg), ServerState(cfg, device=CPU)
    assert strategy.configure_round(server, 0) == []  # clients never get a global model
    data = torch.rand(32, 1, 28, 28)
    for k in range(2):
        update = strategy.client_round(_client(cfg, k), data, round_=0, labels=None,
                                       global_state=None)
        assert update.kind == "decoder" and not any(n.startswith("encoder") for n in
                                                    update.state)
        strategy.accept(server, k, to_message(update, client_id=k), late=k == 1)
    assert sorted(server.registry) == [0, 1]  # a late decoder is still stored
    before = {k: v.clone() for k, v in server.vae.state_dict().items()}
    metrics = strategy.aggregate(server, 0, server.sample_synthetic(round_=0))
    assert metrics["n_synthetic"] == 32 and np.isfinite(metrics["loss"])
    assert any(not torch.equal(before[k], v) for k, v in server.vae.state_dict().items())
    # the optimizer is the strategy's state: a restored strategy continues identically
    restored = build_strategy(cfg)
    restored.load_state_dict(strategy.state_dict(), server)
    assert restored.state_dict()["optimizer"]["state"].keys() == \
        strategy.state_dict()["optimizer"]["state"].keys()


def test_align_fl_refuses_a_whole_model_update():
    cfg = _cfg()
    strategy, server = build_strategy(cfg), ServerState(cfg, device=CPU)
    update = build_strategy(_cfg("fedavg")).client_round(
        _client(cfg), torch.rand(16, 1, 28, 28), round_=0, labels=None,
        global_state=server.global_arrays())
    with pytest.raises(MessageError, match="takes 'decoder' updates, not 'model'"):
        strategy.accept(server, 0, to_message(update), late=False)


# --- FedAvg --------------------------------------------------------------------------------
def test_average_states_is_sample_weighted():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    b = {"w": np.array([4.0, 8.0], np.float32), "n": np.array(9, np.int64)}
    out = average_states([a, b], [100, 200])
    np.testing.assert_allclose(out["w"], [3.0, 6.0])
    assert out["w"].dtype == np.float32 and int(out["n"]) == 3


def _model_update(server, k, state, n):
    return ClientUpdate(round=0, client_id=k, spec=server.spec.to_dict(), state=state,
                        kind="model", metrics={"n_samples": n})


def test_fedavg_averages_into_the_global_model_and_refuses_late_or_foreign_updates():
    cfg = _cfg("fedavg")
    strategy, server = build_strategy(cfg), ServerState(cfg, device=CPU)
    (model,) = strategy.configure_round(server, 0)
    assert isinstance(model, GlobalModel) and set(model.state) == set(server.vae.state_dict())
    states = []
    for k, n in ((0, 10.0), (1, 30.0)):
        st = {kk: v.numpy() + 0.01 * k for kk, v in server.vae.state_dict().items()}
        states.append(st)
        strategy.accept(server, k, _model_update(server, k, st, n), late=False)
    assert sorted(server.registry) == [0, 1]  # decoders kept for evaluation
    assert strategy.aggregate(server, 0, server.sample_synthetic(round_=0)) == \
        {"n_averaged": 2.0}
    name = next(iter(states[0]))
    np.testing.assert_allclose(server.vae.state_dict()[name].numpy(),
                               0.25 * states[0][name] + 0.75 * states[1][name],
                               rtol=1e-6, atol=1e-7)
    assert strategy.aggregate(server, 1, server.sample_synthetic(round_=1)) == \
        {"n_averaged": 0.0}  # nothing pending: the global model is kept
    with pytest.raises(MessageError, match="late update for round 1 is not averaged"):
        strategy.accept(server, 0, _model_update(server, 0, states[0], 1.0), late=True)
    bad = ClientUpdate(round=0, client_id=0, spec={**server.spec.to_dict(), "latent_dim": 3},
                       state=states[0], kind="model")
    with pytest.raises(MessageError, match="differs from the global model"):
        strategy.accept(server, 0, bad, late=False)
    with pytest.raises(MessageError, match="takes 'model' updates, not 'decoder'"):
        strategy.accept(server, 0, ClientUpdate(round=0, client_id=0, spec=bad.spec,
                                                state=states[0]), late=False)


def test_fedavg_client_starts_from_the_global_model_and_shares_it_whole():
    cfg = ClientConfig(model=ModelConfig(hidden=(16, 8)), local_epochs=1, batch_size=16)
    state = new_local_state(0, cfg, seed=0, device=CPU)
    own = {k: v.numpy().copy() for k, v in state.vae.state_dict().items()}
    glob = {k: v.numpy().copy() for k, v in
            new_local_state(0, cfg, seed=9, device=CPU).vae.state_dict().items()}
    with pytest.raises(Exception, match="no global model received"):
        local_round(state, torch.rand(16, 1, 28, 28), round_=0, seed=0, strategy="fedavg")
    update = local_round(state, torch.rand(16, 1, 28, 28), round_=0, seed=0,
                         strategy="fedavg", global_state=glob)
    assert update.kind == "model" and set(update.state) == set(state.vae.state_dict())

    def dist(a, b):
        return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)

    assert 0 < dist(update.state, glob) < 0.01 * dist(update.state, own)


def test_fedprox_pulls_the_local_model_towards_the_global_one():
    cfg = ClientConfig(model=ModelConfig(hidden=(16, 8)), local_epochs=3, batch_size=8, lr=1e-2)
    data = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    glob = {k: v.numpy().copy() for k, v in
            new_local_state(0, cfg, seed=5, device=CPU).vae.state_dict().items()}

    def drift(strategy, **options):
        state = new_local_state(0, cfg, seed=0, device=CPU)
        update = local_round(state, data, round_=0, seed=0, strategy=strategy,
                             global_state=glob, **options)
        return sum(float(((update.state[k] - glob[k]) ** 2).sum()) for k in glob)

    assert drift("fedprox", mu=10.0) < 0.8 * drift("fedavg")
    assert drift("fedprox", mu=0.0) == drift("fedavg")


def test_the_default_strategy_is_one_name_everywhere():
    from alignfl_mpi.config import RunConfig
    from alignfl_mpi.results import DEFAULT_STRATEGY as RESULTS_DEFAULT
    from alignfl_mpi.strategies import DEFAULT_STRATEGY

    assert RunConfig().strategy == RESULTS_DEFAULT == DEFAULT_STRATEGY in STRATEGIES
