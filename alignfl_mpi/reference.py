"""Centralised references: upper bounds from the real data of the same partition.

    alignfl-mpi reference --partition data/partitions/<file>.h5 --out runs/reference

All are trained on the real in-domain images of the partition's clients (outliers left
out) and scored on its real test set:

* ``centralized-vae`` (:func:`centralized_vae`): the run's global VAE (``server.model``,
  ``server.batch_size``, ``server.lr``, ``server.kl_weight`` of the same preset or config)
  trained in one process on the union of the clients' images: the upper bound of every
  quality number of the global VAE (latent accuracy and F1, reconstruction error, the
  per-dimension latent variances), measured with the same evaluation after every epoch;
* ``centralized``: the digit classifier (the LeNet of :mod:`alignfl_mpi.metrics`) on the
  same union, the upper bound of the synthetic-only classifier;
* ``fedavg-classifier``: FedAvg of the same classifier over the clients' partitions,
  simulated in one process (client by client, then the sample-weighted mean; the result
  is the same as a distributed run).

Each writes a results file in the usual schema (``eval/...`` per round, or per epoch for
the centralised ones), so ``alignfl-mpi report`` puts them beside the runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arrays import arrays_to_state, images_to_tensor, state_arrays
from .config import RunConfig, to_dict
from .evaluation import evaluate_vae
from .metrics import LeNet
from .models import build_vae, model_spec, vae_loss
from .results import RESULTS_NAME, ResultsWriter
from .schema import TEST, read_client, read_partition_info, read_split
from .seeds import Role, derive_seed
from .strategies.fedavg import average_states
from .training import last_epoch, train_minibatches

log = logging.getLogger(__name__)


def train_epochs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, *, epochs: int, batch_size: int, seed: int) -> float:
    """Cross-entropy minibatch training; returns the last epoch's mean loss."""
    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        return loss, {"loss": loss}

    model.train()
    history = train_minibatches(optimizer, len(x), loss_fn, epochs=epochs,
                                batch_size=batch_size,
                                generator=torch.Generator().manual_seed(seed))
    return last_epoch(history, ("loss",))["loss"]


def train_vae_epoch(vae: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    *, batch_size: int, kl_weight: float, seed: int,
                    device: torch.device) -> dict[str, float]:
    """One epoch of the server's VAE training (``models.vae_loss``) on ``x``.

    ``seed`` seeds the shuffling and the global torch RNG (the reparameterisation noise).

    Returns:
        The epoch's mean ``loss``, ``recon`` and ``kl``.
    """
    def loss_fn(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = x[idx].to(device, non_blocking=True)
        recon, mu, logvar = vae(batch)
        loss, rec, kl = vae_loss(recon, batch, mu, logvar, kl_weight=kl_weight)
        return loss, {"loss": loss, "recon": rec, "kl": kl}

    torch.manual_seed(seed)
    vae.train()
    history = train_minibatches(optimizer, len(x), loss_fn, epochs=1, batch_size=batch_size,
                                generator=torch.Generator().manual_seed(seed))
    return last_epoch(history, ("loss", "recon", "kl"))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    """Share of ``x`` classified as ``y``."""
    model.eval()
    pred = torch.cat([model(x[i:i + 2048]).argmax(1) for i in range(0, len(x), 2048)])
    return float((pred.numpy() == y).mean())


def _client_sets(partition: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = read_partition_info(partition).n_clients
    sets = []
    for k in range(n):
        c = read_client(partition, k)
        keep = ~c.outlier
        sets.append((images_to_tensor(c.images[keep]), torch.from_numpy(c.labels[keep])))
    return sets


def _new_net(seed: int) -> torch.nn.Module:

    torch.manual_seed(seed)
    return LeNet(n_classes=10)


def _writer(out: Path, config: dict[str, Any], partition: Path) -> ResultsWriter:
    return ResultsWriter(out / RESULTS_NAME, config_json=json.dumps(config, sort_keys=True),
                         attrs={"partition": str(partition), "n_clients": 0})


def centralized(partition: Path, *, out: Path, epochs: int = 5, seed: int = 0,
                batch_size: int = 128) -> list[float]:
    """Train on the union of the real partitions; test accuracy after each epoch."""
    sets = _client_sets(partition)
    x = torch.cat([s[0] for s in sets])
    y = torch.cat([s[1] for s in sets])
    test_x, test_y = read_split(partition, TEST)
    tx = images_to_tensor(test_x)
    net = _new_net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    writer = _writer(out, {"strategy": "centralized", "epochs": epochs, "seed": seed,
                           "rounds": epochs}, partition)
    accs = []
    for e in range(epochs):
        loss = train_epochs(net, opt, x, y, epochs=1, batch_size=batch_size,
                            seed=derive_seed(seed, Role.REFERENCE_TRAIN, e))
        accs.append(accuracy(net, tx, test_y))
        writer.write_round(e, clients={}, server={"loss": loss, "n_train": float(len(x))},
                           evaluation={"task_accuracy": accs[-1]}, timings={})
        log.info("centralized epoch %d/%d | loss %.4f | task acc %.4f", e + 1, epochs, loss,
                 accs[-1])
    writer.write_final(global_state=state_arrays(net),
                       global_spec={"arch": "lenet"}, decoders={})
    return accs


def fedavg_classifier(partition: Path, *, out: Path, rounds: int = 5, local_epochs: int = 2,
                      seed: int = 0, batch_size: int = 128) -> list[float]:
    """FedAvg of the classifier over the partition's clients; test accuracy per round."""
    sets = _client_sets(partition)
    test_x, test_y = read_split(partition, TEST)
    tx = images_to_tensor(test_x)
    global_net = _new_net(seed)
    writer = _writer(out, {"strategy": "fedavg-classifier", "rounds": rounds,
                           "client": {"local_epochs": local_epochs}, "seed": seed}, partition)
    accs = []
    for r in range(rounds):
        states, weights, clients = [], [], {}
        for k, (x, y) in enumerate(sets):
            net = _new_net(seed)
            net.load_state_dict(global_net.state_dict())
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            loss = train_epochs(net, opt, x, y, epochs=local_epochs, batch_size=batch_size,
                                seed=derive_seed(seed, Role.REFERENCE_CLIENT, k, r))
            states.append(state_arrays(net))
            weights.append(float(len(x)))
            clients[k] = {"status": "ok", "loss": loss, "n_samples": float(len(x))}
        avg = average_states(states, weights)
        global_net.load_state_dict(arrays_to_state(avg))
        accs.append(accuracy(global_net, tx, test_y))
        writer.write_round(r, clients=clients, server={"n_averaged": float(len(sets))},
                           evaluation={"task_accuracy": accs[-1]}, timings={})
        log.info("fedavg-classifier round %d/%d | task acc %.4f", r + 1, rounds, accs[-1])
    writer.write_final(global_state=state_arrays(global_net),
                       global_spec={"arch": "lenet"}, decoders={})
    return accs


def centralized_vae(partition: Path, cfg: RunConfig, *, out: Path, epochs: int = 10,
                    seed: int = 0) -> list[dict[str, float]]:
    """Train the run's global VAE on the union of the real partitions; evaluate each epoch.

    The model, batch size, learning rate and KL weight are the config's ``server`` ones
    (the global VAE of ALIGN-FL and FedAvg), the loss is ``models.vae_loss`` as in the
    server's training, and each epoch is scored by ``evaluation.evaluate_vae`` on the
    partition's test set exactly as ``assess`` scores the global VAE every round.

    Returns:
        The evaluation of every epoch (``latent_accuracy``, ``latent_f1``,
        ``recon_error``, ``latent_var_<d>``, ``latent_var_min_ratio``).
    """

    s = cfg.server
    sets = _client_sets(partition)
    x = torch.cat([images for images, _ in sets])
    test_x, test_y = read_split(partition, TEST)
    spec = model_spec(s.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(derive_seed(seed, Role.SERVER_INIT))  # the global VAE's first weights
    vae = build_vae(spec).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=s.lr)
    config = {"strategy": "centralized-vae", "rounds": epochs, "seed": seed,
              "server": to_dict(s)}
    writer = _writer(out, config, partition)
    history = []
    for e in range(epochs):
        terms = train_vae_epoch(vae, opt, x, batch_size=s.batch_size, kl_weight=s.kl_weight,
                                seed=derive_seed(seed, Role.REFERENCE_TRAIN, e), device=device)
        metrics = {k: float(v) for k, v in evaluate_vae(vae, test_x, test_y, seed=42,
                                                        device=device).items()}
        history.append(metrics)
        writer.write_round(e, clients={},
                           server={"loss": terms["loss"], "recon": terms["recon"],
                                   "kl": terms["kl"], "n_train": float(len(x))},
                           evaluation=metrics, timings={})
        log.info("centralized-vae epoch %d/%d | loss %.3f | latent acc %.4f | f1 %.4f | "
                 "recon %.3f | latent var min/max %.3f", e + 1, epochs, terms["loss"],
                 metrics["latent_accuracy"], metrics["latent_f1"], metrics["recon_error"],
                 metrics["latent_var_min_ratio"])
    writer.write_final(global_state=state_arrays(vae),
                       global_spec=spec.to_dict(), decoders={})
    return history
