"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): FedAvg clients,
an Adam step on the server.

The client round is FedAvg's. The server treats the sample-weighted mean of the round's
updates as a pseudo-gradient step and applies Adam to it (Algorithm 2 of the paper, as
Flower's ``FedAdam.aggregate_fit`` does it), in float64::

    delta = average - global
    m = beta_1 m + (1 - beta_1) delta
    v = beta_2 v + (1 - beta_2) delta^2
    global = global + eta m / (sqrt(v) + tau)

with ``m = v = 0`` before the first round and no bias correction: the paper's update, and
Flower's ``fedadam.py`` as read (later Flower versions scale ``eta`` by Adam's bias
correction, ``eta_norm``). Only the model's
parameters take the Adam step; buffers (spectral norm's power-iteration vectors) and
non-float tensors take the average, as FedAvg does.

Options (``[strategy_options]``), defaults and where they come from:

* ``eta = 0.1``, ``beta_1 = 0.9``, ``beta_2 = 0.99``: Flower's ``FedAdam`` defaults
  (``src/py/flwr/server/strategy/fedadam.py``, ``fedopt.py``).
* ``tau = 1e-3``: the value the paper's experiments often use, not Flower's ``1e-9``.
  With ``tau`` near 0 the first step is ``eta * sign(delta)`` for every weight, however
  small its delta: 0.1 on weights initialised at about ``1/sqrt(784) = 0.036``, which
  wipes the VAE out. With ``1e-3`` a weight whose delta is far below ``tau`` moves in
  proportion to it.

The moments ``m`` and ``v`` are the strategy's server state (:meth:`FedAdam.state_dict`,
float64 tensors), so ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError
from .fedavg import FedAvg

if TYPE_CHECKING:
    from ..server import ServerState

Moments = dict[str, dict[str, np.ndarray]]
"""``{"m": {name: float64 array}, "v": {...}}``: the server's Adam moments."""


def adam_step(current: dict[str, np.ndarray], average: dict[str, np.ndarray],
              moments: Moments, *, names: set[str], eta: float, beta_1: float, beta_2: float,
              tau: float) -> tuple[dict[str, np.ndarray], Moments]:
    """One FedAdam server step; returns the new global state and the new moments.

    Tensors named in ``names`` (float ones only) take the Adam step from ``current``
    with ``average - current`` as the pseudo-gradient, in float64, cast back to their
    dtype; every other tensor is the average's. ``moments`` is not modified.

    >>> cur, avg = {"w": np.array([1.0])}, {"w": np.array([3.0])}
    >>> new, mom = adam_step(cur, avg, {"m": {}, "v": {}}, names={"w"}, eta=0.1,
    ...                      beta_1=0.9, beta_2=0.99, tau=0.0)
    >>> [float(a.round(6)[0]) for a in (new["w"], mom["m"]["w"], mom["v"]["w"])]
    [1.1, 0.2, 0.04]
    """
    out: dict[str, np.ndarray] = {}
    new: Moments = {"m": dict(moments["m"]), "v": dict(moments["v"])}
    for name, avg in average.items():
        if name not in names or avg.dtype.kind != "f":
            out[name] = avg.copy()
            continue
        cur = current[name].astype(np.float64)
        delta = avg.astype(np.float64) - cur
        m = beta_1 * new["m"].get(name, np.zeros_like(delta)) + (1 - beta_1) * delta
        v = beta_2 * new["v"].get(name, np.zeros_like(delta)) + (1 - beta_2) * delta * delta
        new["m"][name], new["v"][name] = m, v
        out[name] = (cur + eta * m / (np.sqrt(v) + tau)).astype(avg.dtype)
    return out, new


class FedAdam(FedAvg):
    """FedAvg clients; the server applies Adam to the averaged pseudo-gradient."""

    name = "fedadam"
    title = "FedAdam"
    OPTIONS = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.moments: Moments = {"m": {}, "v": {}}

    def validate(self) -> None:
        super().validate()
        o = self.options
        for key in ("eta", "tau"):
            if not (o[key] > 0 and math.isfinite(o[key])):
                raise ConfigError(f"strategy_options.{key} must be a finite number > 0, got "
                                  f"{o[key]}")
        for key in ("beta_1", "beta_2"):
            if not 0 <= o[key] < 1:
                raise ConfigError(f"strategy_options.{key} must be in [0, 1), got {o[key]}")

    def server_update(self, server: ServerState, average: dict[str, np.ndarray], *,
                      round_: int) -> dict[str, float]:
        """The Adam step from the global model towards the average; its L2 norm."""
        current = server.global_arrays()
        names = {n for n, _ in server.vae.named_parameters()}
        o = self.options
        new, self.moments = adam_step(current, average, self.moments, names=names,
                                      eta=o["eta"], beta_1=o["beta_1"], beta_2=o["beta_2"],
                                      tau=o["tau"])
        server.load_global(new)
        step = sum(float(np.sum((new[n].astype(np.float64) - current[n]) ** 2))
                   for n in names if n in new)
        return {"server_step_norm": math.sqrt(step)}

    def state_dict(self) -> dict[str, Any]:
        """The moments as float64 CPU tensors (``torch.load(weights_only=True)`` reads them)."""
        return {key: {n: torch.from_numpy(a.copy()) for n, a in table.items()}
                for key, table in self.moments.items()}

    def load_state_dict(self, state: dict[str, Any], server: ServerState) -> None:
        self.moments = {key: {n: t.numpy().astype(np.float64)
                              for n, t in state.get(key, {}).items()} for key in ("m", "v")}
