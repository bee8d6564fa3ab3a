"""The stateful server algorithm: decoder registry, synthetic sampling, global training.

Plain PyTorch, no MPI. The server keeps the latest accepted decoder and prior of every
client. Each round it samples ``samples_per_client`` images per client (prior -> decoder,
labelled with the client id), pools them, and trains the persistent global VAE on the
pool for ``epochs`` epochs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .client import CLASS_WEIGHTS, model_spec, round_seed
from .config import RunConfig
from .errors import AlignFLError, MessageError
from .models import ModelSpec, build_decoder, build_vae, decoder_state_shapes, vae_loss
from .prior import GaussianMixturePrior, standard_normal_prior

log = logging.getLogger(__name__)

SERVER_ROLE = 0  # role id for derived seeds; clients use 1 + client_id
CLASSIFIER_INIT = 2**31 - 1  # "round" of the digit classifier's initial weights


@dataclass
class DecoderEntry:
    """A client's latest accepted decoder and prior."""

    client_id: int
    spec: ModelSpec
    decoder: torch.nn.Module
    prior: GaussianMixturePrior
    round: int
    metrics: dict[str, float]
    class_weights: np.ndarray | None = None  # conditional decoders: label distribution

    def sample(self, n: int, *, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images (prior -> decoder) and their class labels (-1 if unconditional)."""
        z = self.prior.sample(n, generator=generator).to(device)
        if self.class_weights is None:
            return self.decoder(z), torch.full((n,), -1, dtype=torch.long)
        y = torch.multinomial(torch.from_numpy(self.class_weights).double(), n,
                              replacement=True, generator=generator)
        n_classes = self.spec.n_classes
        onehot = torch.nn.functional.one_hot(y, n_classes).float().to(device)
        return self.decoder(torch.cat([z, onehot], dim=1)), y


def split_class_weights(model: ModelSpec, prior: dict[str, np.ndarray]
                        ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Separate a conditional decoder's label distribution from its latent prior.

    Raises:
        MessageError: A conditional decoder without a valid distribution, or an
            unconditional one with one.
    """
    prior = dict(prior)
    weights = prior.pop(CLASS_WEIGHTS, None)
    if not model.n_classes:
        if weights is not None:
            raise MessageError("class weights sent with an unconditional decoder")
        return prior, None
    if weights is None or weights.shape != (model.n_classes,):
        raise MessageError(f"a conditional decoder needs class weights of shape "
                           f"({model.n_classes},)")
    weights = np.asarray(weights, np.float64)
    if not np.isfinite(weights).all() or (weights < 0).any() or abs(weights.sum() - 1) > 1e-4:
        raise MessageError("class weights must be a probability vector")
    return prior, weights / weights.sum()


def validate_update(*, spec: dict[str, Any], state: dict[str, np.ndarray],
                    prior: dict[str, np.ndarray],
                    image_shape: tuple[int, int, int]) -> tuple[ModelSpec, GaussianMixturePrior]:
    """Check a received update against the model zoo before anything is built from it.

    Raises:
        MessageError: Unregistered architecture, wrong tensor names or shapes,
            non-finite values, an invalid prior, or the wrong image shape.
    """
    try:
        model = ModelSpec.from_dict(spec)
    except AlignFLError as exc:
        raise MessageError(f"invalid decoder spec: {exc}") from None
    if tuple(model.image_shape) != tuple(image_shape):
        raise MessageError(f"decoder image shape {model.image_shape} != server's {image_shape}")
    expected = decoder_state_shapes(model)
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise MessageError(f"decoder tensors do not match the {model.arch} spec "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    for name, shape in expected.items():
        arr = state[name]
        if tuple(arr.shape) != tuple(shape):
            raise MessageError(f"decoder tensor {name} has shape {tuple(arr.shape)}, "
                               f"spec says {tuple(shape)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise MessageError(f"decoder tensor {name} has non-finite values")
    prior, _ = split_class_weights(model, prior)
    return model, GaussianMixturePrior.from_arrays(prior, latent_dim=model.latent_dim)


def average_states(states: list[dict[str, np.ndarray]], weights: list[float]
                   ) -> dict[str, np.ndarray]:
    """Weighted average of state dicts (FedAvg); integer tensors take the first state's.

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


class ServerState:
    """The server's state: global VAE + optimizer, and the decoder registry."""

    def __init__(self, cfg: RunConfig, *, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        torch.manual_seed(round_seed(cfg.seed, SERVER_ROLE, 0))
        self.spec = model_spec(cfg.server.model)
        self.vae = build_vae(self.spec).to(device)
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=cfg.server.lr)
        self.registry: dict[int, DecoderEntry] = {}
        self.pending: dict[int, tuple[dict[str, np.ndarray], float]] = {}
        self.last_classes = torch.empty(0, dtype=torch.long)
        self.classifier: Any = None  # digit classifier on the synthetic pool (optional)
        self.classifier_optimizer: Any = None
        self.rounds_done = 0

    # --- decoder registry ---------------------------------------------------------------
    def accept(self, client_id: int, *, spec: dict[str, Any], state: dict[str, np.ndarray],
               prior: dict[str, np.ndarray], round_: int, metrics: dict[str, float]) -> None:
        """Validate and store a client's update, replacing its previous one.

        Raises:
            MessageError: The update is invalid; the stored decoder is kept.
        """
        model, gm = validate_update(spec=spec, state=state, prior=prior,
                                    image_shape=tuple(self.spec.image_shape))
        decoder = build_decoder(model)
        decoder.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                strict=True)
        decoder.to(self.device).eval()
        _, class_weights = split_class_weights(model, prior)
        self.registry[client_id] = DecoderEntry(client_id=client_id, spec=model,
                                                decoder=decoder, prior=gm, round=round_,
                                                metrics=dict(metrics),
                                                class_weights=class_weights)

    def accept_full(self, client_id: int, *, spec: dict[str, Any], state: dict[str, np.ndarray],
                    round_: int, metrics: dict[str, float]) -> None:
        """FedAvg/FedProx: validate a whole-VAE update and keep it for averaging.

        Its decoder part also goes into the registry (with the N(0, I) prior the VAE was
        trained towards), so that the evaluation can sample what the server saw.

        Raises:
            MessageError: The spec differs from the global model's, or the tensors do not
                match it.
        """
        if spec != self.spec.to_dict():
            raise MessageError(f"model spec {spec} differs from the global model's "
                               f"{self.spec.to_dict()}; FedAvg needs identical models")
        expected = {k: tuple(v.shape) for k, v in self.vae.state_dict().items()}
        if set(expected) != set(state):
            raise MessageError("model tensors do not match the global model")
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise MessageError(f"model tensor {name} has shape {tuple(state[name].shape)}, "
                                   f"expected {shape}")
        self.pending[client_id] = (state, float(metrics.get("n_samples", 1.0)))
        prefix = "decoder."
        decoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        prior = standard_normal_prior(self.spec.latent_dim).to_arrays()
        self.accept(client_id, spec=spec, state=decoder, prior=prior, round_=round_,
                    metrics=metrics)

    def average_pending(self) -> dict[str, float]:
        """FedAvg: replace the global VAE by the sample-weighted mean of this round's updates."""
        if not self.pending:
            return {"n_averaged": 0.0}
        ids = sorted(self.pending)
        avg = average_states([self.pending[c][0] for c in ids], [self.pending[c][1] for c in ids])
        self.vae.load_state_dict({k: torch.from_numpy(v) for k, v in avg.items()}, strict=True)
        self.pending.clear()
        return {"n_averaged": float(len(ids))}

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The global VAE's state as contiguous numpy arrays (sent to FedAvg clients)."""
        return {k: np.ascontiguousarray(v.detach().cpu().numpy())
                for k, v in self.vae.state_dict().items()}

    # --- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_synthetic(self, *, round_: int,
                         n_per_client: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_per_client`` images from every stored decoder (prior -> decoder).

        Returns:
            ``(images (M*K, C, H, W) float in [0, 1] on the server device, labels (M*K,)
            client ids)``; empty tensors when no decoder is stored yet. The class labels
            of conditional decoders' samples (-1 otherwise) are kept in
            :attr:`last_classes`.
        """
        n = n_per_client or self.cfg.server.samples_per_client
        gen = torch.Generator().manual_seed(round_seed(self.cfg.seed, SERVER_ROLE, 2 * round_ + 1))
        images, labels, classes = [], [], []
        for cid in sorted(self.registry):
            x, y = self.registry[cid].sample(n, generator=gen, device=self.device)
            images.append(x.reshape(n, *self.spec.image_shape))
            labels.append(torch.full((n,), cid, dtype=torch.long))
            classes.append(y)
        if not images:
            self.last_classes = torch.empty(0, dtype=torch.long)
            return torch.empty(0, *self.spec.image_shape), torch.empty(0, dtype=torch.long)
        self.last_classes = torch.cat(classes)
        return torch.cat(images), torch.cat(labels)

    @torch.no_grad()
    def sample_client(self, client_id: int, n: int, *, seed: int) -> torch.Tensor:
        """``n`` images from one stored decoder (for grids and privacy measurements)."""
        gen = torch.Generator().manual_seed(seed)
        x, _ = self.registry[client_id].sample(n, generator=gen, device=self.device)
        return x.reshape(n, *self.spec.image_shape)

    # --- global training ----------------------------------------------------------------
    def train_global(self, images: torch.Tensor, *, round_: int) -> dict[str, float]:
        """Train the persistent global VAE on the synthetic pool for ``server.epochs``."""
        s = self.cfg.server
        rs = round_seed(self.cfg.seed, SERVER_ROLE, 2 * round_ + 2)
        torch.manual_seed(rs)
        gen = torch.Generator().manual_seed(rs)
        self.vae.train()
        n = len(images)
        history = []
        for _ in range(s.epochs):
            order = torch.randperm(n, generator=gen)
            sums = np.zeros(3)
            for start in range(0, n, s.batch_size):
                x = images[order[start:start + s.batch_size]].to(self.device)
                recon, mu, logvar = self.vae(x)
                loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_weight=s.kl_weight)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                sums += np.array([loss.item(), rec.item(), kl.item()]) * len(x)
            history.append(sums / n)
        last = history[-1]
        return {"loss": float(last[0]), "recon": float(last[1]), "kl": float(last[2]),
                "first_epoch_loss": float(history[0][0]), "n_synthetic": float(n)}

    # --- digit classifier on the labelled synthetic pool ---------------------------------
    def train_classifier(self, images: torch.Tensor, classes: torch.Tensor, *,
                         round_: int) -> dict[str, float]:
        """Train the persistent digit classifier on the pool's labelled digits (0-9).

        Only conditional decoders' samples carry labels; the outlier label 10 and
        unlabelled samples (-1) are left out.
        """
        from .metrics import LeNet

        keep = (classes >= 0) & (classes < 10)
        if not bool(keep.any()):
            return {"classifier_samples": 0.0}
        rs = round_seed(self.cfg.seed, SERVER_ROLE, 2 * round_ + 3)
        if self.classifier is None:
            torch.manual_seed(round_seed(self.cfg.seed, SERVER_ROLE, CLASSIFIER_INIT))
            self.classifier = LeNet(n_classes=10).to(self.device)
            self.classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=1e-3)
        x, y = images[keep], classes[keep].to(self.device)
        gen = torch.Generator().manual_seed(rs)
        self.classifier.train()
        total = 0.0
        for _ in range(self.cfg.server.classifier_epochs):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), self.cfg.server.batch_size):
                idx = order[start:start + self.cfg.server.batch_size]
                loss = torch.nn.functional.cross_entropy(self.classifier(x[idx]), y[idx])
                self.classifier_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.classifier_optimizer.step()
                total += loss.item() * len(idx)
        return {"classifier_loss": total / len(x), "classifier_samples": float(len(x))}

    # --- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, registry, round."""
        registry = {}
        for cid, e in self.registry.items():
            registry[str(cid)] = {
                "spec": e.spec.to_dict(), "round": e.round, "metrics": e.metrics,
                "decoder": {k: v.detach().cpu() for k, v in e.decoder.state_dict().items()},
                "prior": {k: torch.from_numpy(np.array(v))
                          for k, v in self._prior_arrays(e).items()},
            }
        out = {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(),
               "registry": registry, "rounds_done": self.rounds_done}
        if self.classifier is not None:
            out["classifier"] = self.classifier.state_dict()
            out["classifier_optimizer"] = self.classifier_optimizer.state_dict()
        return out

    @staticmethod
    def _prior_arrays(entry: DecoderEntry) -> dict[str, np.ndarray]:
        arrays = entry.prior.to_arrays()
        if entry.class_weights is not None:
            arrays[CLASS_WEIGHTS] = entry.class_weights
        return arrays

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_done = int(state["rounds_done"])
        if "classifier" in state:
            from .metrics import LeNet

            self.classifier = LeNet(n_classes=10).to(self.device)
            self.classifier.load_state_dict(state["classifier"])
            self.classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=1e-3)
            self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])
        self.registry.clear()
        for cid, e in state["registry"].items():
            self.accept(int(cid), spec=e["spec"],
                        state={k: v.numpy() for k, v in e["decoder"].items()},
                        prior={k: v.numpy() for k, v in e["prior"].items()},
                        round_=int(e["round"]), metrics=dict(e["metrics"]))
