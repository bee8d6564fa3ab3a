"""MOON (Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021): FedAvg with a
model-contrastive term in the client loss.

The client adds ``mu * l_con`` to its loss, with, per sample (averaged over the batch)::

    l_con = -log( exp(sim(z, z_glob)/T) / (exp(sim(z, z_glob)/T) + sum_i exp(sim(z, z_prev_i)/T)) )

``sim`` the cosine similarity and ``T`` the temperature; ``z`` is the representation of the
VAE being trained, ``z_glob`` that of the global model received this round (frozen),
``z_prev_i`` those of the client's own models at the end of its last ``buffer_size``
completed local rounds (frozen). The server is FedAvg's.

The defaults are the paper's reference code's (github.com/MakGulati/ALIGN-FL,
``src/ALIGN_FL/utils/gen_utils.py``, ``standard_local_model_train_moon``, run by
``runner/sim_moon_vae.py``), which defines the MOON the paper compares against:

* ``representation = "z"``: a reparameterised sample ``mu + sigma * eps`` of each model's
  posterior, with fresh noise for each model (from the round's seeded RNG, so a resumed
  round repeats it). The named alternative ``"mu"`` takes the posterior means instead
  (deterministic, like the projection head of MOON's own code); the gradient then reaches
  the mean head only, not the log-variance head.
* ``buffer_size = 5`` previous models, each one more negative (the reference's
  ``--buffer_size``); MOON's own code keeps 1 (``model_buffer_size``).
* ``mu = 1.0``, ``temperature = 0.5`` (``--mu``, ``--temperature``; also MOON's defaults).
  The reference multiplies the contrastive loss by a variable that its training loop
  overwrites with the posterior mean tensor (``mu``), so its effective weight is not the
  configured one; here it is the scalar ``mu``.
* **First round**: no term. No client has a previous model then (the reference skips the
  term while its buffer is empty; MOON's code never adds its first model to the pool).

The previous models are the VAE at the end of the client's last *completed* local rounds,
stored in ``state.extra["moon_previous"]`` (a list of CPU state dicts, oldest first) by
:meth:`Moon.after_local_training`; they go into the client's checkpoint with
:class:`~alignfl_mpi.client.LocalState`, so a resumed client continues bit for bit, and a
round that failed half-way never becomes "previous".

DP-MOON (``privacy.mode = "full"``, the N(0, I) prior, as DP-FedAvg): the contrastive term
reads private data, so it cannot be added after the noise like FedProx's proximal term.
It joins each sample's loss before the per-sample clipping instead
(:meth:`ContrastiveTerm.per_sample`, computed from the DP step's own forward pass), so its
gradient is clipped and noised with the VAE loss's, and the accounting is unchanged.
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
"""``state.extra`` key of the client's previous local models (CPU state dicts, oldest first)."""

REPRESENTATIONS = ("z", "mu")
"""What the contrastive term compares: posterior samples (the reference's) or means."""


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: list[torch.Tensor], *,
                     temperature: float, reduction: str = "mean") -> torch.Tensor:
    """MOON's ``l_con``, averaged over the batch (rows are samples; one negative per
    tensor of ``z_prev``); ``reduction="none"`` gives one value per sample.

    >>> z = torch.tensor([[1.0, 0.0]])
    >>> round(float(contrastive_loss(z, z, [-z], temperature=0.5)), 5)  # log(1 + e^-4)
    0.01815
    """
    sims = [F.cosine_similarity(z, other, dim=-1) for other in (z_glob, *z_prev)]
    logits = torch.stack(sims, dim=1) / temperature
    target = torch.zeros(len(z), dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def representation(vae: VAE, x: torch.Tensor, *, kind: str) -> torch.Tensor:
    """The posterior mean (``"mu"``) or one reparameterised sample (``"z"``) of ``x``."""
    mu, logvar = vae.encode(x)
    if kind == "mu":
        return mu
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


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
    loaded) and of the previous local models (``previous``, state dicts).
    """

    reads_data = True

    def __init__(self, vae: VAE, previous: list[dict[str, torch.Tensor]], *, weight: float,
                 temperature: float, kind: str) -> None:
        self.weight, self.temperature, self.kind = weight, temperature, kind
        self.glob = _frozen_copy(vae)
        self.previous = [_frozen_copy(vae, p) for p in previous]

    def __call__(self, vae: VAE, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        z = mu if self.kind == "mu" else representation(vae, x, kind=self.kind)
        return self._loss(z, x, reduction="mean")

    def per_sample(self, vae: VAE, x: torch.Tensor, mu: torch.Tensor,
                   logvar: torch.Tensor) -> torch.Tensor:
        """The term per sample, from the DP step's own forward pass (``mu``, ``logvar``):
        no second encoder pass, so the per-sample clipping covers it (a
        :data:`~alignfl_mpi.privacy.SampleTerm`). Sample i's value reads sample i only."""
        z = mu if self.kind == "mu" else mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self._loss(z, x, reduction="none")

    def _loss(self, z: torch.Tensor, x: torch.Tensor, *, reduction: str) -> torch.Tensor:
        """``mu l_con`` of ``z`` against the frozen global and previous models on ``x``."""
        with torch.no_grad():
            z_glob = representation(self.glob, x, kind=self.kind)
            z_prev = [representation(p, x, kind=self.kind) for p in self.previous]
        return self.weight * contrastive_loss(z, z_glob, z_prev, temperature=self.temperature,
                                              reduction=reduction)


class Moon(FedAvg):
    """FedAvg with MOON's model-contrastive term on the client."""

    name = "moon"
    title = "MOON"
    OPTIONS = {"mu": 1.0, "temperature": 0.5, "buffer_size": 5, "representation": "z"}

    def validate(self) -> None:
        """FedAvg's checks (DP as ``mode = "full"``: the contrastive term then joins each
        sample's clipped loss); ``mu >= 0``, ``temperature > 0``."""
        super().validate()
        mu, temperature = self.options["mu"], self.options["temperature"]
        if not (mu >= 0 and math.isfinite(mu)):
            raise ConfigError(f"strategy_options.mu must be a finite number >= 0, got {mu}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError("strategy_options.temperature must be a finite number > 0, got "
                              f"{temperature}")
        if self.options["buffer_size"] < 1:
            raise ConfigError("strategy_options.buffer_size must be >= 1, got "
                              f"{self.options['buffer_size']}")
        if self.options["representation"] not in REPRESENTATIONS:
            raise ConfigError("strategy_options.representation must be one of "
                              f"{', '.join(REPRESENTATIONS)}, got "
                              f"{self.options['representation']!r}")

    def local_terms(self, state: LocalState) -> list[Any]:
        previous = state.extra.get(PREVIOUS_KEY) or []
        if self.options["mu"] <= 0 or not previous:
            return []
        return [ContrastiveTerm(state.vae, previous, weight=self.options["mu"],
                                temperature=self.options["temperature"],
                                kind=self.options["representation"])]

    def after_local_training(self, state: LocalState) -> None:
        """Add the trained VAE (CPU copies) to the previous models, keep the newest
        ``buffer_size``."""
        previous = list(state.extra.get(PREVIOUS_KEY) or [])
        previous.append({k: v.detach().to("cpu", copy=True)
                         for k, v in state.vae.state_dict().items()})
        state.extra[PREVIOUS_KEY] = previous[-int(self.options["buffer_size"]):]
