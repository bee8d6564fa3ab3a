"""ALIGN-FL: clients share decoders and latent priors; the server trains on their samples.

Client: ``local_epochs`` from its own previous weights (it never receives a global model),
then a latent prior (a diagonal GMM) fitted on its latents; it shares only the decoder
spec, the decoder weights and the prior, never the encoder (``privacy.mode`` may make
both private). Server: the synthetic pool drawn from every stored decoder trains the
persistent global VAE for ``server.epochs``, and, when conditional decoders label their
samples, a digit classifier for ``server.classifier_epochs``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from ..client import (
    LocalState,
    Posterior,
    SharedUpdate,
    begin_round,
    build_update,
    class_weights,
    finish_round,
    fit_prior,
    lipschitz_term,
    train_vae,
)
from ..metrics import LeNet
from ..models import vae_loss
from ..prior import CLASS_WEIGHTS
from ..privacy import train_private_round
from ..seeds import Role, derive_seed
from ..training import SKIPPED, train_minibatches
from .base import Strategy

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..server import ServerState

log = logging.getLogger(__name__)


class AlignFL(Strategy):
    """The paper's method (the default strategy)."""

    name = "align-fl"
    title = "ALIGN-FL"
    update_kind = "decoder"
    supports_conditional = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.optimizer: torch.optim.Optimizer | None = None  # the global VAE's
        self.classifier: LeNet | None = None  # digit classifier on the labelled pool
        self.classifier_optimizer: torch.optim.Optimizer | None = None

    # --- client side ----------------------------------------------------------------------
    def client_round(self, state: LocalState, data: torch.Tensor, *, round_: int,
                     labels: torch.Tensor | None,
                     global_state: dict[str, Any] | None) -> SharedUpdate:
        started = time.perf_counter()
        rs, generator = begin_round(state, seed=self.cfg.seed, round_=round_)
        cfg = state.cfg
        if state.private:
            metrics, prior = train_private_round(state, data, round_=round_, seed=rs,
                                                 generator=generator)
        else:
            cond = labels if cfg.model.conditional else None
            posterior: Posterior | None = [] if cfg.prior_fit_on == "z" else None
            metrics = train_vae(state, data, generator=generator,
                                terms=(lipschitz_term(state, generator),), labels=cond,
                                posterior=posterior)
            prior = fit_prior(state, data, seed=rs, labels=cond, posterior=posterior)
        finish_round(state, metrics, round_=round_, started=started, n_samples=len(data))
        update = build_update(state, prior, metrics)
        if cfg.model.conditional:
            if labels is None:
                raise ValueError("a conditional client needs its labels")
            update.prior[CLASS_WEIGHTS] = class_weights(labels)
        return update

    # --- server side ----------------------------------------------------------------------
    def aggregate(self, server: ServerState, round_: int,
                  pool: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        images, _ = pool
        if not len(images):
            log.warning("round %d: no decoder stored yet; the global model is not trained",
                        round_ + 1)
            return {"n_synthetic": 0.0}
        metrics = self.train_global(server, images, round_=round_)
        if self.cfg.server.classifier_epochs:
            metrics.update(self.train_classifier(server, images, server.last_classes,
                                                 round_=round_))
        return metrics

    def evaluate(self, server: ServerState, round_: int, evaluator: Any) -> dict[str, float]:
        """The digit classifier's accuracy on the real test set, once it exists."""
        if self.classifier is None:
            return {}
        return {"task_accuracy": evaluator.task_accuracy(self.classifier)}

    def _global_optimizer(self, server: ServerState) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(server.vae.parameters(), lr=self.cfg.server.lr)
        return self.optimizer

    def train_global(self, server: ServerState, images: torch.Tensor, *,
                     round_: int) -> dict[str, float]:
        """Train the persistent global VAE on the synthetic pool for ``server.epochs``."""
        s = self.cfg.server
        n = len(images)
        if not bool(torch.isfinite(images).all()):
            log.error("round %d: the synthetic pool holds non-finite values; the global model "
                      "is not trained this round", round_ + 1)
            return {"n_synthetic": float(n), "pool_rejected": 1.0}
        rs = derive_seed(self.cfg.seed, Role.SERVER_TRAIN, round_)
        torch.manual_seed(rs)
        vae, device = server.vae, server.device

        def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            x = images[idx].to(device)
            recon, mu, logvar = vae(x)
            loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_weight=s.kl_weight)
            return loss, {"loss": loss, "recon": rec, "kl": kl}

        vae.train()
        optimizer = self._global_optimizer(server)
        if s.fresh_optimizer:  # a new Adam every round, as the reference code
            optimizer.state.clear()
        history = train_minibatches(optimizer, n, loss_fn,
                                    epochs=s.epochs, batch_size=s.batch_size,
                                    generator=torch.Generator().manual_seed(rs),
                                    skip_nonfinite=True)
        skipped = sum(h[SKIPPED] for h in history)
        if skipped:
            log.warning("round %d: %d global training steps skipped on a non-finite loss",
                        round_ + 1, skipped)
        last, first = history[-1], history[0]
        nan = float("nan")
        return {"loss": last.get("loss", nan), "recon": last.get("recon", nan),
                "kl": last.get("kl", nan), "first_epoch_loss": first.get("loss", nan),
                "n_synthetic": float(n), "skipped_steps": float(skipped)}

    def train_classifier(self, server: ServerState, images: torch.Tensor,
                         classes: torch.Tensor, *, round_: int) -> dict[str, float]:
        """Train the persistent digit classifier on the pool's labelled digits (0-9).

        Only conditional decoders' samples carry labels; the outlier label 10 and
        unlabelled samples (-1) are left out.
        """
        keep = (classes >= 0) & (classes < 10)
        if not bool(keep.any()):
            return {"classifier_samples": 0.0}
        if self.classifier is None:
            torch.manual_seed(derive_seed(self.cfg.seed, Role.CLASSIFIER_INIT))
            self._new_classifier(server.device)
        assert self.classifier is not None and self.classifier_optimizer is not None
        x, y = images[keep], classes[keep].to(server.device)
        classifier = self.classifier

        def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = torch.nn.functional.cross_entropy(classifier(x[idx]), y[idx])
            return loss, {"loss": loss}

        classifier.train()
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, Role.CLASSIFIER_TRAIN,
                                                        round_))
        history = train_minibatches(self.classifier_optimizer, len(x), loss_fn,
                                    epochs=self.cfg.server.classifier_epochs,
                                    batch_size=self.cfg.server.batch_size, generator=gen)
        return {"classifier_loss": history[-1]["loss"], "classifier_samples": float(len(x))}

    def _new_classifier(self, device: torch.device) -> None:
        self.classifier = LeNet(n_classes=10).to(device)
        self.classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=1e-3)

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.state_dict()
        if self.classifier is not None and self.classifier_optimizer is not None:
            out["classifier"] = self.classifier.state_dict()
            out["classifier_optimizer"] = self.classifier_optimizer.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any], server: ServerState) -> None:
        if "optimizer" in state:
            self._global_optimizer(server).load_state_dict(state["optimizer"])
        if "classifier" in state:
            self._new_classifier(server.device)
            assert self.classifier is not None and self.classifier_optimizer is not None
            self.classifier.load_state_dict(state["classifier"])
            self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])
