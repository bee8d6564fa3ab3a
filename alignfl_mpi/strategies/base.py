"""The :class:`Strategy` interface: one federated algorithm, its client and server halves.

The runtime (:mod:`alignfl_mpi.runtime`) owns the ranks, the messages, deadlines,
failures, results and checkpoints; it never asks which strategy runs. A strategy says:

* **configuration** -- :meth:`Strategy.validate`: the settings it refuses, one line each;
  its own options come from the config's ``[strategy_options]`` table (:attr:`OPTIONS`).
* **client side** -- :meth:`Strategy.client_round`: one local round on private data, and
  what leaves the client (:class:`~alignfl_mpi.client.SharedUpdate`).
* **server side** -- :meth:`Strategy.configure_round` (what to send before a round),
  :meth:`Strategy.accept` (take one validated update), :meth:`Strategy.aggregate`
  (aggregate or train the global model), :meth:`Strategy.evaluate` (extra per-round
  evaluation values), and :meth:`Strategy.state_dict` / :meth:`Strategy.load_state_dict`
  for the server checkpoint.

The server's shared state (global VAE, decoder registry, synthetic sampling) is a
:class:`~alignfl_mpi.server.ServerState`; anything else a strategy keeps (ALIGN-FL's
optimizer, FedAvg's pending updates, FedAdam's moments) lives in the strategy object.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..client import LocalState, SharedUpdate
from ..config import RunConfig, check_message_limit
from ..errors import ConfigError, MessageError
from ..messages import ClientUpdate, GlobalModel
from ..privacy import validate_private_client

if TYPE_CHECKING:
    from ..server import ServerState


class Strategy:
    """Base class of the strategies; subclasses set the class attributes and the hooks."""

    #: The config's ``strategy`` value.
    name: ClassVar[str] = ""
    #: How reports print it.
    title: ClassVar[str] = ""
    #: What a client shares: ``"decoder"`` (never the encoder) or ``"model"`` (the whole VAE).
    update_kind: ClassVar[str] = "decoder"
    #: Clients start each round from the global model (sent by :meth:`configure_round`);
    #: every client must then have the server's model, and late updates are refused.
    needs_global_model: ClassVar[bool] = False
    #: Whether conditional VAEs (``model.conditional``) are supported.
    supports_conditional: ClassVar[bool] = False
    #: The ``[strategy_options]`` this strategy reads, with their defaults; a value must
    #: have its default's type (an int is also a float).
    OPTIONS: ClassVar[dict[str, float | int | str]] = {}

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        unknown = sorted(set(cfg.strategy_options) - set(self.OPTIONS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.OPTIONS), n=1)
            hint = (f"; did you mean {close[0]!r}?" if close else
                    f"; it takes {', '.join(sorted(self.OPTIONS)) or 'none'}")
            raise ConfigError(f"strategy_options.{unknown[0]} is not an option of strategy "
                              f"{self.name!r}{hint}")
        self.options: dict[str, Any] = dict(self.OPTIONS)
        for key, value in cfg.strategy_options.items():
            default = self.OPTIONS[key]
            if isinstance(default, float) and isinstance(value, int | float):
                value = float(value)
            elif isinstance(default, int) and not isinstance(value, int):
                raise ConfigError(f"strategy_options.{key} must be an integer, got {value!r}")
            elif isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"strategy_options.{key} must be a string, got {value!r}")
            elif not isinstance(value, type(default)):
                raise ConfigError(f"strategy_options.{key} must be a number, got {value!r}")
            self.options[key] = value

    # --- configuration --------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse settings this strategy cannot honour (raises ConfigError, one line).

        The base checks every client's privacy settings, conditional models, models that
        must equal the server's, and that ``server.max_message_mb`` fits every message.
        """
        cfg = self.cfg
        for k in range(cfg.n_clients):
            c = cfg.client_config(k)
            where = f"clients[{k}]" if cfg.clients else "client"
            validate_private_client(c)
            if c.model.conditional and not self.supports_conditional:
                raise ConfigError(f"{where}.model.conditional is not supported by strategy "
                                  f"{self.name!r} (it trains and averages without labels)")
            if self.needs_global_model and c.model != cfg.server.model:
                raise ConfigError(f"strategy {self.name!r} averages weights and needs every "
                                  f"client to have the server's model; client {k} has "
                                  f"{c.model} but server.model is {cfg.server.model}")
        if cfg.server.pipeline and self.needs_global_model:
            raise ConfigError(f"server.pipeline cannot run strategy {self.name!r}: its clients "
                              "start each round from the global model of the round before; "
                              "set server.pipeline = false")
        check_message_limit(cfg, whole_model=self.update_kind == "model")

    # --- client side ----------------------------------------------------------------------
    def client_round(self, state: LocalState, data: torch.Tensor, *, round_: int,
                     labels: torch.Tensor | None,
                     global_state: dict[str, Any] | None) -> SharedUpdate:
        """One local round from the client's state; returns what the client shares.

        Args:
            data: The client's images, float32 ``(N, 1, 28, 28)`` in ``[0, 1]``.
            labels: Their labels (conditional VAEs, and strategies that use them).
            global_state: The last global model received (:attr:`needs_global_model`).
        """
        raise NotImplementedError

    # --- server side ----------------------------------------------------------------------
    def configure_round(self, server: ServerState, round_: int) -> list[Any]:
        """Messages to send to every asked client before its TRAIN instruction."""
        if self.needs_global_model:
            return [GlobalModel(round=round_, state=server.global_arrays())]
        return []

    def accept(self, server: ServerState, client_id: int, update: ClientUpdate, *,
               late: bool) -> None:
        """Take one update (already checked to answer the client's request).

        Raises:
            MessageError: The update is refused; whatever was stored is kept.
        """
        self.check_update(update, late=late)
        server.accept(client_id, spec=update.spec, state=update.state, prior=update.prior,
                      round_=update.round, metrics=update.metrics)

    def check_update(self, update: ClientUpdate, *, late: bool) -> None:
        """Refuse an update of the wrong kind, or a late one where clients start from the
        global model (it was trained from an older one).

        Raises:
            MessageError: One line naming the reason.
        """
        if update.kind != self.update_kind:
            raise MessageError(f"strategy {self.name!r} takes '{self.update_kind}' updates, "
                               f"not '{update.kind}'")
        if late and self.needs_global_model:
            raise MessageError(f"late update for round {update.round + 1} is not averaged")

    def aggregate(self, server: ServerState, round_: int,
                  pool: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """Aggregate the round's updates or train the global model; the server metrics.

        Args:
            pool: The round's synthetic pool ``(images, client ids)`` drawn from the
                stored decoders (empty tensors when none is stored).
        """
        raise NotImplementedError

    def evaluate(self, server: ServerState, round_: int, evaluator: Any) -> dict[str, float]:
        """Extra evaluation values of the round (merged into the evaluation record).

        ``evaluator`` is the run's :class:`~alignfl_mpi.assess.RoundEvaluator` (it holds
        the real test split).
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own server state, for the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any], server: ServerState) -> None:
        """Restore :meth:`state_dict` (``server``: the restored shared state)."""
