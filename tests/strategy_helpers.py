"""Helpers for tests that run one strategy's halves without MPI."""

from __future__ import annotations

from typing import Any

import torch

from alignfl_mpi.client import LocalState, SharedUpdate
from alignfl_mpi.config import RunConfig
from alignfl_mpi.messages import ClientUpdate
from alignfl_mpi.strategies import Strategy, strategy_class


def make_strategy(name: str = "align-fl", *, seed: int = 0, cfg: RunConfig | None = None,
                  **options: float) -> Strategy:
    """The strategy ``name`` for ``cfg`` (default: a default run with ``seed``)."""
    if cfg is None:
        cfg = RunConfig(seed=seed, strategy=name, strategy_options=dict(options))
    return strategy_class(cfg.strategy)(cfg)


def local_round(state: LocalState, data: torch.Tensor, *, round_: int, seed: int,
                labels: torch.Tensor | None = None, strategy: str = "align-fl",
                global_state: dict[str, Any] | None = None, **options: float) -> SharedUpdate:
    """One local round of ``strategy`` (run seed ``seed``) on ``state``."""
    return make_strategy(strategy, seed=seed, **options).client_round(
        state, data, round_=round_, labels=labels, global_state=global_state)


def to_message(update: SharedUpdate, *, client_id: int = 0, round_: int = 0) -> ClientUpdate:
    """The wire payload of a client's update."""
    return ClientUpdate(round=round_, client_id=client_id, spec=update.spec,
                        state=update.state, kind=update.kind, prior=update.prior,
                        metrics=update.metrics)
