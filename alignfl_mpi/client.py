"""A client's local state, and the building blocks of one local round.

Plain PyTorch, no MPI, no strategy: the strategies (:mod:`alignfl_mpi.strategies`) compose
these into their local round. A client is stateful: it keeps its VAE and optimizer
across rounds. :func:`build_update` is the single place that decides what leaves a client;
:func:`shared_metrics` keeps the metrics that depend on private data without noise local.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .arrays import state_arrays
from .lipschitz import Penalty, make_penalty
from .models import CONDITIONAL_CLASSES, VAE, build_vae, latent_means, model_spec, vae_loss
from .prior import GaussianMixturePrior, fit_gmm, fit_gmm_sklearn
from .privacy import LOCAL_ONLY_METRICS
from .seeds import Role, derive_seed
from .training import train_minibatches

if TYPE_CHECKING:
    from .config import ClientConfig

log = logging.getLogger(__name__)

Term = Callable[[VAE, torch.Tensor, torch.Tensor], torch.Tensor]
"""An extra loss term ``(vae, x, mu) -> scalar`` of a minibatch (reported as ``penalty``)."""

Posterior = list[tuple[torch.Tensor, torch.Tensor]]
"""Every step's detached ``(mu, logvar)``, collected for the prior fit on samples z."""


@dataclass
class LocalState:
    """Everything a client keeps between rounds (and checkpoints)."""

    client_id: int
    cfg: ClientConfig
    vae: VAE
    optimizer: torch.optim.Optimizer
    device: torch.device
    rounds_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # accountant, strategy state, ...

    def state_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "rounds_done": self.rounds_done,
                "vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "extra": self.extra}

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint (or a spill) must keep to go on bit for bit: :meth:`state_dict`,
        less the optimizer's per-parameter state (Adam's moments and step) when
        ``fresh_optimizer`` clears it at the start of the next round anyway
        (:func:`begin_round`); the optimizer's settings stay. With the ``paper`` VAE that
        is 4.5 of the 13.6 MB.
        """
        state = self.state_dict()
        if self.cfg.fresh_optimizer:
            state["optimizer"] = {**state["optimizer"], "state": {}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_done = int(state["rounds_done"])
        self.extra = dict(state.get("extra", {}))

    @property
    def private(self) -> bool:
        """Whether this client trains with DP (``privacy.mode`` other than ``none``)."""
        return self.cfg.privacy.mode != "none"


def new_local_state(client_id: int, cfg: ClientConfig, *, seed: int,
                    device: torch.device) -> LocalState:
    """A fresh client VAE (seeded per client) and its Adam optimizer."""
    torch.manual_seed(derive_seed(seed, Role.CLIENT_INIT, client_id))
    vae = build_vae(model_spec(cfg.model)).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    return LocalState(client_id=client_id, cfg=cfg, vae=vae, optimizer=optimizer, device=device)


def begin_round(state: LocalState, *, seed: int, round_: int) -> tuple[int, torch.Generator]:
    """The round's public seed and generator; also seeds torch's global RNG with it.

    Derived from ``(seed, client, round)``, so a resumed run repeats a round exactly. With
    ``fresh_optimizer`` the optimizer's state (Adam's moments and step) is cleared first.
    """
    if state.cfg.fresh_optimizer:
        state.optimizer.state.clear()
    rs = derive_seed(seed, Role.CLIENT_ROUND, state.client_id, round_)
    torch.manual_seed(rs)
    return rs, torch.Generator().manual_seed(rs)


def penalty_term(penalty: Penalty) -> Term:
    """A Lipschitz penalty ``(vae, mu) -> (tensor, its detached value)`` as a :data:`Term`."""
    return lambda vae, _x, mu: penalty(vae, mu)[0]


def lipschitz_term(state: LocalState, generator: torch.Generator) -> Term | None:
    """The decoder's Lipschitz gradient penalty at the batch's latent means, if configured."""
    if state.cfg.lipschitz.weight <= 0:
        return None
    return penalty_term(make_penalty(state.cfg.lipschitz, generator=generator))


def train_vae(state: LocalState, data: torch.Tensor, *, generator: torch.Generator,
              terms: tuple[Term | None, ...] = (), labels: torch.Tensor | None = None,
              posterior: Posterior | None = None) -> dict[str, float]:
    """``local_epochs`` of minibatch VAE training; the last epoch's mean loss terms.

    Args:
        terms: Extra loss terms (``None`` entries skipped); their sum is ``penalty``.
        labels: The conditioning labels of a conditional VAE.
        posterior: If given, every step's ``(mu, logvar)`` is appended (detached, CPU)
            for the prior fit on reparameterised samples (``prior_fit_on = "z"``).
    """
    cfg, vae, device = state.cfg, state.vae, state.device
    active = [t for t in terms if t is not None]

    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = data[idx].to(device, non_blocking=True)
        y = None if labels is None else labels[idx].to(device)
        recon, mu, logvar = vae(x, y)
        if posterior is not None:
            posterior.append((mu.detach().cpu(), logvar.detach().cpu()))
        loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_weight=cfg.kl_weight)
        penalty = torch.zeros((), device=device)
        for term in active:
            penalty = penalty + term(vae, x, mu)
        loss = loss + penalty
        return loss, {"loss": loss, "recon": rec, "kl": kl, "penalty": penalty}

    vae.train()
    history = train_minibatches(state.optimizer, len(data), loss_fn, epochs=cfg.local_epochs,
                                batch_size=cfg.batch_size, generator=generator)
    return dict(history[-1])


def reparameterised_samples(posterior: Posterior, *, seed: int) -> np.ndarray:
    """One draw z = mu + exp(logvar / 2) * eps per collected posterior, float64 (N, D).

    ``eps`` comes from ``np.random.default_rng(seed)``, so a resumed round draws the same z.

    >>> post = [(torch.zeros(3, 2), torch.full((3, 2), -80.0))]
    >>> bool(np.abs(reparameterised_samples(post, seed=0)).max() < 1e-12)
    True
    """
    mu = torch.cat([m for m, _ in posterior]).double().numpy()
    std = torch.cat([lv for _, lv in posterior]).double().mul(0.5).exp().numpy()
    return mu + std * np.random.default_rng(seed).standard_normal(mu.shape)


def fit_prior(state: LocalState, data: torch.Tensor, *, seed: int,
              labels: torch.Tensor | None = None,
              posterior: Posterior | None = None) -> GaussianMixturePrior:
    """Fit the shared latent prior (a diagonal GMM).

    With ``prior_fit_on = "z"`` (and ``posterior`` collected during the round's training,
    as the reference code does) on one reparameterised sample per training step and
    image; with ``"mu"`` on the final encoder's latent means of ``data``. Fitted by
    ``prior_fitter``: scikit-learn as the reference code, or alignfl_mpi's EM.
    """
    if state.cfg.prior_fit_on == "z" and posterior:
        latents = reparameterised_samples(posterior, seed=seed)
    else:
        latents = latent_means(state.vae, data, device=state.device, labels=labels)
    if state.cfg.prior_fitter == "sklearn":
        return fit_gmm_sklearn(latents, n_components=state.cfg.prior_components)
    return fit_gmm(latents, n_components=state.cfg.prior_components, seed=seed)


def class_weights(labels: torch.Tensor) -> np.ndarray:
    """A conditional client's label distribution over :data:`CONDITIONAL_CLASSES` labels.

    >>> class_weights(torch.tensor([0, 0, 10])).round(3).tolist()[::10]
    [0.667, 0.333]
    """
    counts = np.bincount(labels.cpu().numpy(), minlength=CONDITIONAL_CLASSES).astype(np.float64)
    return counts / counts.sum()


@dataclass(frozen=True)
class SharedUpdate:
    """What leaves a client: spec and weights (decoder or whole VAE), prior, metrics."""

    spec: dict[str, Any]
    state: dict[str, np.ndarray]
    prior: dict[str, np.ndarray]
    metrics: dict[str, float]
    kind: str = "decoder"


def finish_round(state: LocalState, metrics: dict[str, float], *, round_: int, started: float,
                 n_samples: int) -> None:
    """Book a finished local round: the round counter, ``train_s`` and ``n_samples``."""
    state.rounds_done = round_ + 1
    metrics["train_s"] = time.perf_counter() - started
    metrics["n_samples"] = float(n_samples)


def build_update(state: LocalState, prior: GaussianMixturePrior, metrics: dict[str, float], *,
                 whole: bool = False) -> SharedUpdate:
    """The only function that decides what a client shares: never data.

    ``whole=False`` (ALIGN-FL) shares the decoder only, never the encoder; ``whole=True``
    (the averaging strategies) shares the whole VAE. In DP modes the exact training losses
    stay on the client (:func:`shared_metrics`).
    """
    spec = model_spec(state.cfg.model).to_dict()
    module = state.vae if whole else state.vae.decoder
    return SharedUpdate(spec=spec, state=state_arrays(module), prior=prior.to_arrays(),
                        metrics=shared_metrics(state, metrics),
                        kind="model" if whole else "decoder")


def shared_metrics(state: LocalState, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a client may send: in DP modes without ``privacy.LOCAL_ONLY_METRICS``.

    Those (exact losses, the penalty, the round's wall time ``train_s``) depend on private
    data without noise; they are logged here instead.
    """
    if state.private:
        kept = {k: v for k, v in metrics.items() if k in LOCAL_ONLY_METRICS}
        log.info("client %d round %d (local only): %s", state.client_id, state.rounds_done - 1,
                 ", ".join(f"{k}={v:.4g}" for k, v in kept.items()))
        metrics = {k: v for k, v in metrics.items() if k not in LOCAL_ONLY_METRICS}
    return {k: float(v) for k, v in metrics.items()}
