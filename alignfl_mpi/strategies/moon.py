"""MOON (Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021): FedAvg with a
model-contrastive term in the client loss.

The client adds ``mu * l_con`` to its loss, with, per sample (averaged over the batch)::

    l_con = -log( exp(sim(z, z_glob)/T) / (exp(sim(z, z_glob)/T) + exp(sim(z, z_prev)/T)) )

``sim`` the cosine similarity and ``T`` the temperature; ``z`` is the representation of the
VAE being trained, ``z_glob`` that of the global model received this round (frozen),
``z_prev`` that of the client's own model at the end of its previous local round (frozen).
The server is FedAvg's.

Choices, and where they come from:

* **Representation**: the encoder's posterior mean ``mu`` (the deterministic output of the
  encoder and its mean head, as MOON's projection head output is deterministic). The
  reference code (github.com/MakGulati/ALIGN-FL, ``src/ALIGN_FL/utils/gen_utils.py``,
  ``standard_local_model_train_moon``, run by ``runner/sim_moon_vae.py``) compares
  reparameterised samples ``mu + sigma * eps`` instead, with fresh noise for each of the
  three models; so the gradient reaches the encoder's mean and log-variance heads there,
  and only the mean head (and the encoder body) here.
* **Defaults** ``mu = 1.0``, ``temperature = 0.5``: the reference code's (``--mu``,
  ``--temperature`` in ``sim_moon_vae.py``), which are also MOON's own defaults
  (QinbinLi/MOON ``main.py``).
* **First round**: no term. Neither MOON's code nor the reference has a previous model in
  a client's first round (the pool is empty: the logits hold the positive pair only and
  the cross-entropy is 0). Taking the global model as the previous one would give the
  same training: then ``sim(z, z_glob) = sim(z, z_prev)`` and ``l_con = log 2`` has no
  gradient.
* **One previous model** (MOON's ``model_buffer_size = 1``); the reference keeps up to 5
  (``--buffer_size``), each a further negative.

The previous model is the VAE at the end of the client's last *completed* local round,
stored in ``state.extra["moon_previous"]`` (CPU tensors) by
:meth:`Moon.after_local_training`; it goes into the client's checkpoint with
:class:`~alignfl_mpi.client.LocalState`, so a resumed client continues bit for bit, and a
round that failed half-way never becomes "previous".

DP is refused: the contrastive term reads private data, so it cannot be added after the
DP noise, and the DP-SGD trainer has no per-sample term for it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..client import LocalState
from ..errors import ConfigError
from ..models import VAE
from .fedavg import FedAvg

PREVIOUS_KEY = "moon_previous"
"""``state.extra`` key of the client's previous local model (name -> CPU tensor)."""


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, *,
                     temperature: float) -> torch.Tensor:
    """MOON's ``l_con``, averaged over the batch (rows are samples).

    >>> z = torch.tensor([[1.0, 0.0]])
    >>> round(float(contrastive_loss(z, z, -z, temperature=0.5)), 5)  # log(1 + e^-4)
    0.01815
    """
    logits = torch.stack([F.cosine_similarity(z, z_glob, dim=-1),
                          F.cosine_similarity(z, z_prev, dim=-1)], dim=1) / temperature
    target = torch.zeros(len(z), dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, target)


def _frozen_copy(vae: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> VAE:
    """A copy of ``vae`` (with ``state`` loaded) in eval mode, without gradients."""
    out = copy.deepcopy(vae)
    if not isinstance(out, VAE):
        raise TypeError(f"MOON needs a VAE with an encoder, not {type(vae).__name__}")
    if state is not None:
        out.load_state_dict(state, strict=True)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


class ContrastiveTerm:
    """``weight * l_con`` of a minibatch, as a client loss term ``(vae, x, mu) -> scalar``.

    Holds frozen copies of the global model (``vae`` as given: the global weights just
    loaded) and of the previous local model (``previous``, a state dict).
    """

    reads_data = True

    def __init__(self, vae: torch.nn.Module, previous: dict[str, torch.Tensor], *,
                 weight: float, temperature: float) -> None:
        self.weight, self.temperature = weight, temperature
        self.glob = _frozen_copy(vae)
        self.previous = _frozen_copy(vae, previous)

    def __call__(self, vae: torch.nn.Module, x: torch.Tensor, mu: torch.Tensor
                 ) -> torch.Tensor:
        with torch.no_grad():
            z_glob, _ = self.glob.encode(x)
            z_prev, _ = self.previous.encode(x)
        return self.weight * contrastive_loss(mu, z_glob, z_prev,
                                              temperature=self.temperature)


class Moon(FedAvg):
    """FedAvg with MOON's model-contrastive term on the client."""

    name = "moon"
    title = "MOON"
    OPTIONS = {"mu": 1.0, "temperature": 0.5}

    def validate(self) -> None:
        """No DP (the term reads private data); ``mu >= 0``, ``temperature > 0``."""
        for k in range(self.cfg.n_clients):
            mode = self.cfg.client_config(k).privacy.mode
            if mode != "none":
                where = f"clients[{k}]" if self.cfg.clients else "client"
                raise ConfigError(
                    f"strategy 'moon' cannot run with {where}.privacy.mode = {mode!r}: its "
                    "contrastive term reads private data and cannot be added after the DP "
                    "noise; set privacy.mode = 'none'")
        super().validate()
        mu, temperature = self.options["mu"], self.options["temperature"]
        if not (mu >= 0 and math.isfinite(mu)):
            raise ConfigError(f"strategy_options.mu must be a finite number >= 0, got {mu}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError("strategy_options.temperature must be a finite number > 0, got "
                              f"{temperature}")

    def local_terms(self, state: LocalState) -> list[Any]:
        previous = state.extra.get(PREVIOUS_KEY)
        if self.options["mu"] <= 0 or previous is None:
            return []
        return [ContrastiveTerm(state.vae, previous, weight=self.options["mu"],
                                temperature=self.options["temperature"])]

    def after_local_training(self, state: LocalState) -> None:
        """Keep the trained VAE (CPU copies) as the next round's previous model."""
        state.extra[PREVIOUS_KEY] = {k: v.detach().to("cpu", copy=True)
                                     for k, v in state.vae.state_dict().items()}
