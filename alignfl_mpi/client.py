"""A client: local VAE training on private data, and the update it shares.

Plain PyTorch, no MPI. A client is stateful: it keeps its VAE and optimizer across
rounds, and the server never overwrites them. After local training it fits a latent
prior and shares only ``(decoder spec, decoder weights, prior)`` — never the encoder,
never data (:func:`build_update` is the single place that decides what leaves).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import ClientConfig, ModelConfig
from .models import ModelSpec, build_vae, vae_loss
from .prior import GaussianMixturePrior, fit_gmm, standard_normal_prior

log = logging.getLogger(__name__)


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The model-zoo spec of a model config."""
    return ModelSpec(arch=cfg.arch, latent_dim=cfg.latent_dim, hidden=tuple(cfg.hidden),
                     spectral_norm=cfg.spectral_norm,
                     n_classes=CONDITIONAL_CLASSES if cfg.conditional else 0)


#: Labels a conditional VAE knows: the 10 classes and the outlier label 10.
CONDITIONAL_CLASSES = 11


def round_seed(seed: int, role: int, round_: int) -> int:
    """A seed derived from (run seed, role, round): rounds are reproducible on resume.

    >>> round_seed(0, 1, 2) == round_seed(0, 1, 2) != round_seed(0, 1, 3)
    True
    """
    return int(np.random.SeedSequence([seed, role, round_]).generate_state(1)[0])


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return torch.from_numpy(images).unsqueeze(1).float().div_(255.0)


@dataclass
class LocalState:
    """Everything a client keeps between rounds (and checkpoints)."""

    client_id: int
    cfg: ClientConfig
    vae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    rounds_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the privacy accountant

    def state_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "rounds_done": self.rounds_done,
                "vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "extra": self.extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_done = int(state["rounds_done"])
        self.extra = dict(state.get("extra", {}))


def new_local_state(client_id: int, cfg: ClientConfig, *, seed: int,
                    device: torch.device) -> LocalState:
    """A fresh client VAE (seeded per client) and its Adam optimizer."""
    torch.manual_seed(round_seed(seed, 1000 + client_id, 0))
    vae = build_vae(model_spec(cfg.model)).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    return LocalState(client_id=client_id, cfg=cfg, vae=vae, optimizer=optimizer, device=device)


def train_epochs(vae: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, *,
                 epochs: int, batch_size: int, kl_weight: float, generator: torch.Generator,
                 device: torch.device, penalty: Any = None,
                 labels: torch.Tensor | None = None,
                 posterior: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 ) -> dict[str, float]:
    """Plain minibatch training; returns the mean loss terms of the last epoch.

    Args:
        penalty: Optional callable ``(vae, mu) -> (tensor, float)`` added to the loss
            (the Lipschitz gradient penalty); its float is reported as ``penalty``.
        posterior: If given, every step's ``(mu, logvar)`` is appended (detached, CPU)
            for the prior fit on reparameterised samples (``prior_fit_on = "z"``).
    """
    vae.train()
    n = len(data)
    metrics: dict[str, float] = {}
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "penalty": 0.0}
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = data[idx].to(device, non_blocking=True)
            y = None if labels is None else labels[idx].to(device)
            recon, mu, logvar = vae(x, y)
            if posterior is not None:
                posterior.append((mu.detach().cpu(), logvar.detach().cpu()))
            loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_weight=kl_weight)
            if penalty is not None:
                pen, pen_value = penalty(vae, mu)
                loss = loss + pen
                sums["penalty"] += pen_value * len(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item() * len(x)
            sums["recon"] += rec.item() * len(x)
            sums["kl"] += kl.item() * len(x)
        metrics = {k: v / n for k, v in sums.items()}
    return metrics


@torch.no_grad()
def latent_means(vae: torch.nn.Module, data: torch.Tensor, *, device: torch.device,
                 batch_size: int = 2048, labels: torch.Tensor | None = None) -> np.ndarray:
    """Encoder means of ``data`` as float64 numpy (N, D)."""
    was_training = vae.training
    vae.eval()
    out = [vae.encode(data[i:i + batch_size].to(device),
                      None if labels is None else labels[i:i + batch_size].to(device))[0].cpu()
           for i in range(0, len(data), batch_size)]
    vae.train(was_training)
    return torch.cat(out).double().numpy()


def reparameterised_samples(posterior: list[tuple[torch.Tensor, torch.Tensor]], *,
                            seed: int) -> np.ndarray:
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
              posterior: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              ) -> GaussianMixturePrior:
    """Fit the shared latent prior (a diagonal GMM).

    With ``prior_fit_on = "z"`` (and ``posterior`` collected during the round's training,
    as the reference code does) on one reparameterised sample per training step and
    image; with ``"mu"`` on the final encoder's latent means of ``data``.
    """
    if state.cfg.prior_fit_on == "z" and posterior:
        latents = reparameterised_samples(posterior, seed=seed)
    else:
        latents = latent_means(state.vae, data, device=state.device, labels=labels)
    return fit_gmm(latents, n_components=state.cfg.prior_components, seed=seed)


def decoder_arrays(vae: torch.nn.Module) -> dict[str, np.ndarray]:
    """The decoder's state dict as contiguous CPU numpy arrays."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy())
            for k, v in vae.decoder.state_dict().items()}


@dataclass(frozen=True)
class SharedUpdate:
    """What leaves a client: decoder spec and weights, prior, and scalar metrics."""

    spec: dict[str, Any]
    state: dict[str, np.ndarray]
    prior: dict[str, np.ndarray]
    metrics: dict[str, float]


def build_update(state: LocalState, prior: GaussianMixturePrior,
                 metrics: dict[str, float]) -> SharedUpdate:
    """The only function that decides what a client shares: no encoder, no data.

    In DP modes the exact training losses stay on the client (they are computed on
    private data without noise, so the accountant would not cover them).
    """
    spec = model_spec(state.cfg.model).to_dict()
    return SharedUpdate(spec=spec, state=decoder_arrays(state.vae), prior=prior.to_arrays(),
                        metrics=shared_metrics(state, metrics))


def shared_metrics(state: LocalState, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a client may send: in DP modes without ``privacy.LOCAL_ONLY_METRICS``.

    Those (exact losses, the penalty, the round's wall time ``train_s``) depend on private
    data without noise; they are logged here instead.
    """
    if state.cfg.privacy.mode != "none":
        from .privacy import LOCAL_ONLY_METRICS

        kept = {k: v for k, v in metrics.items() if k in LOCAL_ONLY_METRICS}
        log.info("client %d round %d (local only): %s", state.client_id, state.rounds_done - 1,
                 ", ".join(f"{k}={v:.4g}" for k, v in kept.items()))
        metrics = {k: v for k, v in metrics.items() if k not in LOCAL_ONLY_METRICS}
    return {k: float(v) for k, v in metrics.items()}


def run_local_round(state: LocalState, data: torch.Tensor, *, round_: int,
                    seed: int, labels: torch.Tensor | None = None) -> SharedUpdate:
    """Train E local epochs from the client's own previous weights, fit the prior, share.

    Seeds are derived from ``(seed, client, round)`` so a resumed run repeats a round exactly.
    """
    start = time.perf_counter()
    rs = round_seed(seed, 1 + state.client_id, round_)
    torch.manual_seed(rs)
    generator = torch.Generator().manual_seed(rs)
    cfg = state.cfg
    if cfg.privacy.mode != "none":
        from .privacy import train_private_round

        metrics, prior = train_private_round(state, data, round_=round_, seed=rs,
                                             generator=generator)
    else:
        penalty = None
        if cfg.lipschitz.weight > 0:
            from .lipschitz import make_penalty

            penalty = make_penalty(cfg.lipschitz, generator=generator)
        cond = labels if cfg.model.conditional else None
        posterior: list[tuple[torch.Tensor, torch.Tensor]] | None = (
            [] if cfg.prior_fit_on == "z" else None)
        metrics = train_epochs(state.vae, state.optimizer, data, epochs=cfg.local_epochs,
                               batch_size=cfg.batch_size, kl_weight=cfg.kl_weight,
                               generator=generator, device=state.device, penalty=penalty,
                               labels=cond, posterior=posterior)
        prior = fit_prior(state, data, seed=rs, labels=cond, posterior=posterior)
    state.rounds_done = round_ + 1
    metrics["train_s"] = time.perf_counter() - start
    metrics["n_samples"] = float(len(data))
    update = build_update(state, prior, metrics)
    if cfg.model.conditional:
        if labels is None:
            raise ValueError("a conditional client needs its labels")
        counts = np.bincount(labels.numpy(), minlength=CONDITIONAL_CLASSES).astype(np.float64)
        update.prior[CLASS_WEIGHTS] = counts / counts.sum()
    return update


#: Extra prior array of a conditional client: its label distribution (n_classes,).
CLASS_WEIGHTS = "class_weights"


def proximal_penalty(vae: torch.nn.Module, anchor: dict[str, torch.Tensor], *,
                     mu: float) -> Any:
    """FedProx's ``mu/2 ||w - w_global||^2`` as a ``train_epochs`` penalty."""
    params = [(p, anchor[name]) for name, p in vae.named_parameters()]

    def penalty(_vae: torch.nn.Module, _mu: torch.Tensor) -> tuple[torch.Tensor, float]:
        value = 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in params)
        return value, float(value.detach())
    return penalty


def _sum_penalties(*terms: Any) -> Any:
    """One ``train_epochs`` penalty that adds up the given ones (``None`` entries skipped)."""
    active = [t for t in terms if t is not None]
    if len(active) <= 1:
        return active[0] if active else None

    def total(vae: torch.nn.Module, mu: torch.Tensor) -> tuple[torch.Tensor, float]:
        values = [t(vae, mu) for t in active]
        return sum(v for v, _ in values), sum(f for _, f in values)
    return total


def run_averaging_round(state: LocalState, data: torch.Tensor, global_state: dict[str, Any], *,
                        round_: int, seed: int, mu: float = 0.0) -> SharedUpdate:
    """FedAvg (``mu = 0``) or FedProx: start from the global weights, train, share everything.

    The baselines share the whole VAE (encoder included) with an N(0, I) prior; a fresh
    Adam optimizer is used every round, as in the usual FedAvg client. With
    ``privacy.mode = "full"`` this is DP-FedAvg / DP-FedProx: the same DP-SGD trainer and
    accountant as ALIGN-FL (``privacy.train_private_round``, ``prior = "standard"``), with
    the proximal term's gradient added after the noise (it reads no data). The Lipschitz
    penalty (``lipschitz.weight > 0``) is honoured as in ALIGN-FL.
    """
    start = time.perf_counter()
    rs = round_seed(seed, 1 + state.client_id, round_)
    torch.manual_seed(rs)
    generator = torch.Generator().manual_seed(rs)
    cfg = state.cfg
    state.vae.load_state_dict({k: torch.as_tensor(v) for k, v in global_state.items()},
                              strict=True)
    state.optimizer = torch.optim.Adam(state.vae.parameters(), lr=cfg.lr)
    proximal = None
    if mu > 0:
        anchor = {k: v.detach().clone() for k, v in state.vae.named_parameters()}
        proximal = proximal_penalty(state.vae, anchor, mu=mu)
    if cfg.privacy.mode != "none":
        from .privacy import train_private_round

        regulariser = None if proximal is None else (lambda vae: proximal(vae, None))
        metrics, _ = train_private_round(state, data, round_=round_, seed=rs,
                                         generator=generator, regulariser=regulariser)
    else:
        lipschitz = None
        if cfg.lipschitz.weight > 0:
            from .lipschitz import make_penalty

            lipschitz = make_penalty(cfg.lipschitz, generator=generator)
        metrics = train_epochs(state.vae, state.optimizer, data, epochs=cfg.local_epochs,
                               batch_size=cfg.batch_size, kl_weight=cfg.kl_weight,
                               generator=generator, device=state.device,
                               penalty=_sum_penalties(proximal, lipschitz))
    state.rounds_done = round_ + 1
    metrics["train_s"] = time.perf_counter() - start
    metrics["n_samples"] = float(len(data))
    full = {k: np.ascontiguousarray(v.detach().cpu().numpy())
            for k, v in state.vae.state_dict().items()}
    return SharedUpdate(spec=model_spec(cfg.model).to_dict(), state=full,
                        prior=standard_normal_prior(cfg.model.latent_dim).to_arrays(),
                        metrics=shared_metrics(state, metrics))


def standard_prior_for(state: LocalState) -> GaussianMixturePrior:
    """The data-independent fallback prior N(0, I)."""
    return standard_normal_prior(state.cfg.model.latent_dim)
