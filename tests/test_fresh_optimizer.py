"""``client.fresh_optimizer`` / ``server.fresh_optimizer``: a new Adam every round, as the
reference code builds one in every ``local_model_train_only`` and ``train_global_vae``."""

from __future__ import annotations

import json

import pytest
import torch
from strategy_helpers import make_strategy

from alignfl_mpi.client import begin_round, new_local_state
from alignfl_mpi.config import RunConfig, load_config, to_json
from alignfl_mpi.runtime import changed_settings
from alignfl_mpi.server import ServerState
from alignfl_mpi.strategies.align_fl import AlignFL

CPU = torch.device("cpu")
HIDDEN = "[32, 16, 8]"


def _cfg(fresh: bool) -> RunConfig:
    flag = str(fresh).lower()
    return load_config(overrides=[
        f"client.model.hidden={HIDDEN}", f"server.model.hidden={HIDDEN}", "client.local_epochs=1",
        "client.batch_size=16", "server.epochs=1", "server.batch_size=16",
        f"client.fresh_optimizer={flag}", f"server.fresh_optimizer={flag}"])


def _images(seed: int = 0, n: int = 48) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    return {float(s["step"]) for s in optimizer.state.values()}


@pytest.mark.parametrize("fresh", [False, True])
def test_client_round_starts_from_a_new_adam_only_when_asked(fresh: bool) -> None:
    cfg = _cfg(fresh)
    strategy = AlignFL(cfg)
    state = new_local_state(0, cfg.client, seed=0, device=CPU)
    data = _images()
    strategy.client_round(state, data, round_=0, labels=None, global_state=None)
    assert _adam_steps(state.optimizer) == {3.0}  # 48 images, batch 16, 1 epoch
    strategy.client_round(state, data, round_=1, labels=None, global_state=None)
    assert _adam_steps(state.optimizer) == ({3.0} if fresh else {6.0})


def test_a_cleared_adam_steps_exactly_as_a_new_one() -> None:
    """Clearing the state is the reference's new ``torch.optim.Adam``, bit for bit."""
    cfg = _cfg(True)
    state = new_local_state(0, cfg.client, seed=0, device=CPU)
    strategy = AlignFL(cfg)
    strategy.client_round(state, _images(0), round_=0, labels=None, global_state=None)
    twin = new_local_state(0, cfg.client, seed=0, device=CPU)
    twin.vae.load_state_dict(state.vae.state_dict())
    twin.rounds_done = state.rounds_done
    assert not twin.optimizer.state  # a new Adam, never stepped
    for s in (state, twin):
        strategy.client_round(s, _images(1), round_=1, labels=None, global_state=None)
    for (k, a), b in zip(state.vae.state_dict().items(), twin.vae.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_begin_round_leaves_the_state_alone_without_the_setting() -> None:
    state = new_local_state(0, _cfg(False).client, seed=0, device=CPU)
    state.optimizer.state[next(state.vae.parameters())]["step"] = torch.tensor(7.0)
    begin_round(state, seed=0, round_=1)
    assert _adam_steps(state.optimizer) == {7.0}


@pytest.mark.parametrize("fresh", [False, True])
def test_server_trains_each_round_with_a_new_adam_only_when_asked(fresh: bool) -> None:
    cfg = _cfg(fresh)
    server = ServerState(cfg, device=CPU)
    strategy = make_strategy(cfg=cfg)
    strategy.train_global(server, _images(2), round_=0)
    strategy.train_global(server, _images(3), round_=1)
    assert _adam_steps(strategy.optimizer) == ({3.0} if fresh else {6.0})


def test_paper_presets_use_a_new_adam_every_round_and_classic_keeps_it() -> None:
    for preset in ("paper", "paper-dim8", "dp-eps2"):
        cfg = load_config(preset=preset)
        assert cfg.client.fresh_optimizer and cfg.server.fresh_optimizer, preset
    classic = load_config(preset="classic")
    assert not classic.client.fresh_optimizer and not classic.server.fresh_optimizer


def test_resume_compares_a_key_the_stored_config_lacks_as_its_default() -> None:
    now = json.loads(to_json(RunConfig()))
    stored = json.loads(to_json(RunConfig()))
    del stored["client"]["fresh_optimizer"], stored["server"]["fresh_optimizer"]
    assert changed_settings(stored, now) == []
    now["server"]["fresh_optimizer"] = True  # the run had Adam kept: a real change
    assert changed_settings(stored, now) == ["server.fresh_optimizer"]
    # per-client tables default to the client table's default
    with_clients = json.loads(to_json(load_config(overrides=["n_clients=2"])))
    with_clients["clients"] = [{"id": 1, "fresh_optimizer": False}]
    older = json.loads(json.dumps(with_clients))
    del older["clients"][0]["fresh_optimizer"]
    assert changed_settings(older, with_clients) == []
    with_clients["clients"][0]["fresh_optimizer"] = True
    assert changed_settings(older, with_clients) == ["clients.0.fresh_optimizer"]
    # a value that differs is still refused, whatever the defaults
    changed = json.loads(to_json(RunConfig()))
    changed["server"]["epochs"] = 3
    assert changed_settings(now | {"server": {**now["server"], "fresh_optimizer": False}},
                            changed) == ["server.epochs"]
