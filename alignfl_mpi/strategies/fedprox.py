"""FedProx (Li et al., 2020): FedAvg with a proximal term ``mu/2 ||w - w_global||^2``.

The term reads no data, so under DP (DP-FedProx) it is added after the noise.
Option: ``strategy_options.mu`` (default 0.01).
"""

from __future__ import annotations

from typing import Any

import torch

from ..client import LocalState
from ..errors import ConfigError
from .fedavg import FedAvg


class ProximalTerm:
    """``mu/2 ||w - w_anchor||^2`` over the VAE's parameters, as a client loss term."""

    reads_data = False

    def __init__(self, vae: torch.nn.Module, *, mu: float) -> None:
        self.mu = mu
        self.anchor = {k: v.detach().clone() for k, v in vae.named_parameters()}

    def __call__(self, vae: torch.nn.Module, x: Any, mu: Any) -> torch.Tensor:
        total = sum(((p - self.anchor[name]) ** 2).sum() for name, p in vae.named_parameters())
        return 0.5 * self.mu * torch.as_tensor(total)


class FedProx(FedAvg):
    """FedAvg with the proximal term on the client."""

    name = "fedprox"
    title = "FedProx"
    OPTIONS = {"mu": 0.01}

    def validate(self) -> None:
        super().validate()
        if not self.options["mu"] >= 0:
            raise ConfigError(f"strategy_options.mu must be >= 0, got {self.options['mu']}")

    def local_terms(self, state: LocalState) -> list[Any]:
        if self.options["mu"] <= 0:
            return []
        return [ProximalTerm(state.vae, mu=self.options["mu"])]
