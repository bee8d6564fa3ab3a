"""FedAvg (McMahan et al., 2017): clients train the global VAE, the server averages.

Client: load the global VAE, train ``local_epochs`` with a fresh Adam optimizer (the
usual FedAvg client), share the whole VAE, encoder included, with the N(0, I) prior it
was trained towards. With ``privacy.mode = "full"`` this is DP-FedAvg: the same DP-SGD
trainer and accountant as ALIGN-FL, with :meth:`FedAvg.local_terms`' data-independent
terms added after the noise. Server: the sample-weighted mean of the round's updates
replaces the global VAE (:meth:`FedAvg.server_update`); subclasses change the client's
loss (FedProx, MOON) or the server's update (FedAdam) with one method each. The decoder
part of every update also goes into the registry, so that the evaluation samples what
the server saw.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from ..arrays import arrays_to_state
from ..client import (
    LocalState,
    SharedUpdate,
    begin_round,
    build_update,
    finish_round,
    lipschitz_term,
    train_vae,
)
from ..errors import AlignFLError, ConfigError, MessageError
from ..messages import ClientUpdate
from ..prior import standard_normal_prior
from ..privacy import train_private_round
from .base import Strategy

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..server import ServerState


def average_states(states: list[dict[str, np.ndarray]], weights: list[float]
                   ) -> dict[str, np.ndarray]:
    """Weighted average of state dicts; integer tensors take the first state's.

    >>> average_states([{"w": np.array([0.0])}, {"w": np.array([3.0])}], [1, 2])["w"]
    array([2.])
    """
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        if first.dtype.kind != "f":
            out[name] = first.copy()
            continue
        acc = np.zeros(first.shape, np.float64)
        for st, w in zip(states, weights):
            acc += st[name].astype(np.float64) * (w / total)
        out[name] = acc.astype(first.dtype)
    return out


def _per_sample(terms: list[Any]) -> Any:
    """Terms that read data, each with a per-sample form, as one DP
    :data:`~alignfl_mpi.privacy.SampleTerm` (clipped with the VAE loss)."""
    if not terms:
        return None

    def sample_term(vae: torch.nn.Module, x: torch.Tensor, mu: torch.Tensor,
                    logvar: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, sum(t.per_sample(vae, x, mu, logvar) for t in terms))
    return sample_term


def _data_free(terms: list[Any]) -> Any:
    """Terms that read no data as one DP regulariser ``vae -> (tensor, its detached value)``."""
    if not terms:
        return None

    def regulariser(vae: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | float]:
        value = sum(t(vae, None, None) for t in terms)
        return value, value.detach()
    return regulariser


class FedAvg(Strategy):
    """Federated averaging of the whole VAE."""

    name = "fedavg"
    title = "FedAvg"
    update_kind = "model"
    needs_global_model = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.pending: dict[int, tuple[dict[str, np.ndarray], float]] = {}

    def validate(self) -> None:
        """The base checks, and DP only as ``mode = "full"`` with ``prior = "standard"``.

        The whole VAE is shared, encoder included, with an N(0, I) prior: ``mode =
        "decoder"`` would send a non-private encoder, and a ``dp`` prior would spend
        budget on a release that never happens.
        """
        super().validate()
        for k in range(self.cfg.n_clients):
            c = self.cfg.client_config(k)
            where = f"clients[{k}]" if self.cfg.clients else "client"
            if c.privacy.mode == "none":
                continue
            if c.privacy.mode != "full":
                raise ConfigError(
                    f"strategy {self.name!r} shares the whole VAE, encoder included: "
                    f"{where}.privacy.mode = {c.privacy.mode!r} would send a non-private "
                    "encoder; use 'full'")
            if c.privacy.prior != "standard":
                raise ConfigError(
                    f"strategy {self.name!r} shares the N(0, I) prior, so {where}.privacy.prior"
                    f" = {c.privacy.prior!r} would spend budget on nothing; set it to "
                    "'standard'")

    # --- client side ----------------------------------------------------------------------
    def client_round(self, state: LocalState, data: torch.Tensor, *, round_: int,
                     labels: torch.Tensor | None,
                     global_state: dict[str, Any] | None) -> SharedUpdate:
        if global_state is None:
            raise AlignFLError(f"{self.name}: no global model received before round "
                               f"{round_ + 1}")
        started = time.perf_counter()
        rs, generator = begin_round(state, seed=self.cfg.seed, round_=round_)
        self.before_local_training(state)
        state.vae.load_state_dict(arrays_to_state(global_state), strict=True)
        state.optimizer = torch.optim.Adam(state.vae.parameters(), lr=state.cfg.lr)
        terms = self.local_terms(state)
        if state.private:
            reading = [t for t in terms if t.reads_data]
            if any(not hasattr(t, "per_sample") for t in reading):
                raise ConfigError(f"strategy {self.name!r}: a loss term that reads data "
                                  "and has no per-sample form cannot run under DP")
            metrics, _ = train_private_round(
                state, data, round_=round_, seed=rs, generator=generator,
                regulariser=_data_free([t for t in terms if not t.reads_data]),
                sample_term=_per_sample(reading))
        else:
            metrics = train_vae(state, data, generator=generator,
                                terms=(*terms, lipschitz_term(state, generator)))
        self.after_local_training(state)
        finish_round(state, metrics, round_=round_, started=started, n_samples=len(data))
        return build_update(state, standard_normal_prior(state.cfg.model.latent_dim), metrics,
                            whole=True)

    def local_terms(self, state: LocalState) -> list[Any]:
        """Extra loss terms of the local round, built after the global weights are loaded
        (FedProx's proximal term, MOON's contrastive term). Each is a
        :data:`~alignfl_mpi.client.Term` with a ``reads_data`` attribute."""
        return []

    def before_local_training(self, state: LocalState) -> None:
        """Called before the global weights are loaded (MOON keeps the previous model)."""

    def after_local_training(self, state: LocalState) -> None:
        """Called after local training, before the update is built."""

    # --- server side ----------------------------------------------------------------------
    def accept(self, server: ServerState, client_id: int, update: ClientUpdate, *,
               late: bool) -> None:
        """Check a whole-VAE update against the global model, keep it for averaging.

        Its decoder part also goes into the registry (with the N(0, I) prior the VAE was
        trained towards), so that the evaluation can sample what the server saw.
        """
        self.check_update(update, late=late)
        if update.spec != server.spec.to_dict():
            raise MessageError(f"model spec {update.spec} differs from the global model's "
                               f"{server.spec.to_dict()}; {self.title} needs identical models")
        expected = {k: tuple(v.shape) for k, v in server.vae.state_dict().items()}
        if set(expected) != set(update.state):
            raise MessageError("model tensors do not match the global model")
        for name, shape in expected.items():
            if tuple(update.state[name].shape) != shape:
                raise MessageError(f"model tensor {name} has shape "
                                   f"{tuple(update.state[name].shape)}, expected {shape}")
        prefix = "decoder."
        decoder = {k[len(prefix):]: v for k, v in update.state.items() if k.startswith(prefix)}
        prior = standard_normal_prior(server.spec.latent_dim).to_arrays()
        server.accept(client_id, spec=update.spec, state=decoder, prior=prior,
                      round_=update.round, metrics=update.metrics)
        self.pending[client_id] = (update.state, float(update.metrics.get("n_samples", 1.0)))

    def aggregate(self, server: ServerState, round_: int,
                  pool: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """Replace the global VAE with :meth:`server_update` of the sample-weighted mean."""
        if not self.pending:
            return {"n_averaged": 0.0}
        ids = sorted(self.pending)
        avg = average_states([self.pending[c][0] for c in ids],
                             [self.pending[c][1] for c in ids])
        self.pending.clear()
        metrics = self.server_update(server, avg, round_=round_)
        return {"n_averaged": float(len(ids)), **metrics}

    def server_update(self, server: ServerState, average: dict[str, np.ndarray], *,
                      round_: int) -> dict[str, float]:
        """FedAvg: the average becomes the global model."""
        server.load_global(average)
        return {}
